"""Measuring a loaded model: quality (perplexity, KL, agreement), the decode harness, vision inputs, sensitivity."""
