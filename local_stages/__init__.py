"""Worked example: pipeline stages of your own, outside the qpipe package (see
pipelines/estimate_then_quantize.yaml)."""
