"""Save the tokenizer a random-weight run borrows as a plain folder, to carry it to a machine
that lacks its source package (the lent GPU):

    python bench/save_tokenizer.py .gpu/tokenizer            # Qwen's BPE + InternVL's tokens
    python bench/save_tokenizer.py .gpu/tokenizer smollm2    # SmolLM2's (from its GGUF)

Then ``model.tokenizer=$PWD/.gpu/tokenizer`` (bench/pipeline_internvl.sh picks it up by itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from qpipe.models import load_tokenizer


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/tokenizer")
    name = sys.argv[2] if len(sys.argv) > 2 else "qwen"
    borrower = OmegaConf.create(
        {
            "name": "tokenizer",
            "weights": "random",
            "config": {"model_type": "qwen3"},
            "tokenizer": name,
        }
    )
    tokenizer = load_tokenizer(borrower)
    tokenizer.save_pretrained(out)
    print(f"{name} tokenizer ({len(tokenizer)} tokens) saved to {out}")


if __name__ == "__main__":
    main()
