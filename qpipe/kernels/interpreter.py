"""Whether Triton's CPU interpreter runs the kernels (CI has no GPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton's CPU interpreter (TRITON_INTERPRET=1, the tests) runs our kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
