"""Is the benchmark's KL (top-32 + one tail bucket, a lower bound) ranking quantizers the way
the full-vocabulary KL does? Scores checkpoints of the quality sweep against fp32 SmolLM2.

    python bench/full_kl_smollm2.py --ckpt rtn=PATH --ckpt bnb=PATH --out bench/results

PATH: a quantize stage's checkpoint folder from the sweep of ``bench/quality_smollm2.py``
(``<QPIPE_OUTPUTS>/cache/stages/quantize/<key>/checkpoint``); the name before ``=`` is the
backend that loads it. Writes ``<out>/full_kl_smollm2.json``: the mean full KL(fp32 ‖ quant)
per eval domain over the same 4096 tokens and 1024-token windows as the benchmark.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qpipe.backends import get_backend
from qpipe.config.compose import CONF_DIR
from qpipe.corpora.texts import read_text, token_ids
from qpipe.models import load_tokenizer, materialize

WINDOW = 1024


def log_probs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for i in range(0, ids.numel(), WINDOW):
            logits = model(ids[i : i + WINDOW].view(1, -1)).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", action="append", required=True, help="backend=checkpoint")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
    tokenizer = load_tokenizer(cfg.model)
    texts = {"gpl3": cfg.eval.text, **dict(cfg.eval.get("extra_texts") or {})}
    ids = {d: token_ids(tokenizer, read_text(t), args.tokens) for d, t in texts.items()}
    fp32 = get_backend("none").load(
        materialize(cfg.model), "AutoModelForCausalLM", "cpu", torch.float32, "torch"
    )
    base = {d: log_probs(fp32, x) for d, x in ids.items()}
    del fp32
    results = {}
    for spec in args.ckpt:
        method, path = spec.split("=", 1)
        model = get_backend(method).load(
            Path(path), "AutoModelForCausalLM", "cpu", torch.float32, "torch"
        )
        row = {"checkpoint": path}
        for d, x in ids.items():
            lp = log_probs(model, x)
            total = sum((b.exp() * (b - q)).sum().item() for b, q in zip(base[d], lp, strict=True))
            row[f"kl_full.{d}"] = total / sum(b.shape[0] for b in base[d])
        row["kl_full"] = sum(row[f"kl_full.{d}"] for d in ids) / len(ids)
        results[method] = row
        print(method, {k: round(v, 4) for k, v in row.items() if k.startswith("kl")}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python bench/full_kl_smollm2.py " + " ".join(f"--ckpt {c}" for c in args.ckpt),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": "cpu",
        "versions": {"torch": torch.__version__},
        "tokens_per_domain": args.tokens,
        "results": results,
    }
    (args.out / "full_kl_smollm2.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
