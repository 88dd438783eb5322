"""Does fine-tuning fit? The measured table of issue 32: each row a real `pipeline=finetune` run
(or, for ZeRO-2 with the optimizer offloaded, DeepSpeed's engine over qpipe's plan file) in a
fresh process, its phases' measured peaks against qpipe's estimate, and beside it what
DeepSpeed's estimator, accelerate's estimate-memory and the 16-bytes-a-parameter rule say.

    python bench/finetune_memory.py run OUT --rows qwen_lora_b1 qwen_lora_b1_ckpt ...   # a call
    python bench/finetune_memory.py report OUT1 OUT2 ... --out bench/results             # merge
    python bench/finetune_memory.py list                                                 # rows

A row that runs out of memory is a result ("does not fit"), compared with qpipe's verdict for
the card (the run itself is planned for a card of 1000 GB so that qpipe's own stop does not
keep it from trying). Rows write OUT/rows/<row>.json; `report` writes finetune_<card>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import card_slug, markdown_heading, result_header, write_result  # noqa: E402

QWEN = ["model=qwen3_8b", "model.weights=random", "workload.context_len=2048"]
INTERNVL = ["model=internvl", "model.weights=random", "workload.context_len=2048"]
SMOL = ["model=smollm2", "workload.context_len=2048"]
TINY = ["model=tiny_llama", "workload.context_len=128"]
METHODS = {
    "lora": ["finetune.method=lora", "finetune.precision=mixed"],
    "qlora": ["finetune.method=qlora", "quant=bnb_nf4", "finetune.precision=mixed"],
    "full8": ["finetune.method=full", "finetune.optimizer=adamw_8bit", "finetune.precision=bf16"],
    "full": ["finetune.method=full", "finetune.precision=mixed"],
}


def _rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for method in ("lora", "qlora", "full8"):
        for batch in (1, 4):
            for ckpt in (False, True):
                name = f"qwen_{method}_b{batch}" + ("_ckpt" if ckpt else "")
                rows[name] = (
                    QWEN
                    + METHODS[method]
                    + [
                        f"workload.batch_size={batch}",
                        f"finetune.gradient_checkpointing={str(ckpt).lower()}",
                    ]
                )
    for method in ("lora", "qlora"):
        rows[f"internvl_{method}_b1"] = INTERNVL + METHODS[method] + ["workload.batch_size=1"]
    for method in ("full", "lora", "qlora"):
        rows[f"smollm2_{method}_b4"] = SMOL + METHODS[method] + ["workload.batch_size=4"]
    rows["qwen_zero2_offload_b1_ckpt"] = QWEN + [
        "finetune.method=full", "finetune.precision=mixed", "finetune.sharding=zero2",
        "finetune.offload_optimizer=true", "finetune.gradient_checkpointing=true",
        "workload.batch_size=1",
    ]  # fmt: skip
    # CPU rows (SmolLM2's real weights; host memory) and the scripts' own check (tiny_llama)
    rows["cpu_smollm2_lora"] = [
        "model=smollm2",
        "workload.context_len=256",
        "workload.batch_size=2",
    ]
    rows["cpu_smollm2_full"] = rows["cpu_smollm2_lora"] + ["finetune.method=full"]
    rows["tiny_lora"] = TINY + ["finetune.method=lora"]
    rows["tiny_full8"] = TINY + ["finetune.method=full", "finetune.optimizer=adamw_8bit"]
    rows["tiny_zero2_offload"] = TINY + [
        "finetune.method=full",
        "finetune.sharding=zero2",
        "finetune.offload_optimizer=true",
    ]
    return rows


ROWS = _rows()


def anchors(params: int, trainable_all: bool = True) -> dict[str, float]:
    """What the tools people use say for the same model (model states only, batch 1): DeepSpeed
    ZeRO-2 on one GPU without offload (every parameter trainable), accelerate's "Training using
    Adam" for bf16 mixed precision, and 16 bytes a parameter."""
    out = {"rule16_gb": 16 * params / 1e9}
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(params, 1, 1, cpu_offload=False)
        out["deepspeed_zero2_gb"] = gpu / 1e9
    except Exception as err:  # not installed where the row ran: the report says so
        out["deepspeed_error"] = str(err)[:200]
    try:
        from accelerate.commands.estimate import estimate_training_usage

        sizes = estimate_training_usage(4 * params, "bfloat16")  # accelerate builds it in fp32
        out["accelerate_adam_gb"] = max(sizes.values()) / 1e9
    except Exception as err:
        out["accelerate_error"] = str(err)[:200]
    return out


def _qpipe(args: list[str], run_dir: Path, timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qpipe", *args, f"hydra.run.dir={run_dir}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        return 124, str(err.stdout or "")[-4000:]
    return proc.returncode, (proc.stdout + proc.stderr)[-6000:]


def _real_card_verdict(budget: dict, est_total: float) -> dict:
    """qpipe's verdict for the card the row ran on (the run itself planned a 1000 GB card)."""
    import torch

    if not torch.cuda.is_available():
        return {"card_gb": None, "fits": None}
    card = torch.cuda.get_device_properties(0).total_memory / 1e9
    usable = card * 0.95
    return {"card_gb": card, "usable_gb": usable, "fits": est_total <= usable}


def run_row(name: str, out: Path, extra: list[str], timeout: float) -> dict:
    args = ["pipeline=finetune", *ROWS[name], "mlflow.experiment=finetune-bench", *extra]
    zero = "finetune.sharding=zero2" in args
    if zero:  # the plan is priced and written by qpipe; DeepSpeed's engine runs it here
        args[0] = "pipeline=estimate"
        args.append("workload.mode=finetune")
    if any(a.startswith("model=qwen3_8b") or a.startswith("model=internvl") for a in args):
        args.append("hardware.memory_gb=1000")  # measure even what the verdict refuses
    run_dir = out / "runs" / name
    start = time.perf_counter()
    code, log = _qpipe(args, run_dir, timeout)
    row: dict = {"row": name, "args": args, "exit": code, "seconds": time.perf_counter() - start}
    report_path = run_dir / "run.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        row["metrics"] = report.get("metrics", {})
        row["status"] = report.get("status")
        row["failure"] = report.get("tags", {}).get("qpipe.failure")
    budget_path = run_dir / "logged" / "stages" / "memory_budget.json"
    if budget_path.is_file():
        budget = json.loads(budget_path.read_text())
        est = budget["estimate"]
        row["estimate"] = est
        row["verdict_line"] = budget.get("verdict")
        row["card"] = _real_card_verdict(budget, est["total_gb"])
        params = int(row.get("metrics", {}).get("model.params_b", 0) * 1e9)
        row["anchors"] = anchors(params)
        if zero and code == 0:
            import torch

            cuda = torch.cuda.is_available()
            row["measured"] = _deepspeed_row(args, run_dir) if cuda else {"skipped": "no CUDA"}
    text = (log or "") + str(row.get("failure") or "")
    row["oom"] = "out of memory" in text.lower() or "outofmemory" in text.lower()
    train = run_dir / "logged" / "stages" / "train.json"
    if train.is_file():
        row["train"] = json.loads(train.read_text())
    if code != 0:
        row["log_tail"] = log[-2500:]
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "rows" / f"{name}.json").write_text(json.dumps(row, indent=2, default=str))
    return row


def _deepspeed_row(args: list[str], run_dir: Path) -> dict:
    """ZeRO-2 with the optimizer in host memory, on this one GPU: DeepSpeed's engine built
    from qpipe's ds_config.json, three steps, each phase measured like the train stage."""
    code = f"""
import json, sys, os
sys.argv = ["zero2"]
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29511")
os.environ.setdefault("RANK", "0"); os.environ.setdefault("WORLD_SIZE", "1"); os.environ.setdefault("LOCAL_RANK", "0")
from bench.finetune_memory import zero2_steps
print("ROW", json.dumps(zero2_steps({json.dumps(args)!r}, {str(run_dir)!r})))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=420, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"error": (proc.stdout + proc.stderr)[-3000:]}


def zero2_steps(args_json: str, run_dir: str) -> dict:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from qpipe.corpora.texts import read_text, token_ids
    from qpipe.devices.measure import PhaseMeter
    from qpipe.models import load_config, load_tokenizer, materialize
    from tests.conftest import compose_config

    args = [a for a in json.loads(args_json) if not a.startswith(("pipeline=", "hardware."))]
    cfg = compose_config(*args)
    ds_config = json.loads(
        (Path(run_dir) / "stages" / "memory_budget" / "ds_config.json").read_text()
    )
    load_config(cfg.model)
    folder = materialize(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    deepspeed.init_distributed()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config)  # fmt: skip
    tok = load_tokenizer(cfg.model, folder)
    b, s = int(cfg.workload.batch_size), int(cfg.workload.context_len)
    ids = token_ids(tok, read_text("eval_gpl3.txt"), b * s).view(b, s).cuda()
    meter = PhaseMeter("cuda")
    losses = []
    for step in range(1, 4):
        record = step >= 2
        with meter.phase("forward", record):
            loss = engine(input_ids=ids, labels=ids).loss
        with meter.phase("backward", record):
            engine.backward(loss)
        with meter.phase("optimizer", record):
            engine.step()
        losses.append(float(loss))
    import psutil

    return {"losses": losses, "peaks_gb": meter.peaks, "nvml_gb": meter.nvml,
            "host_rss_gb": psutil.Process().memory_info().rss / 1e9, "engine": "deepspeed"}  # fmt: skip


def cmd_run(ns: argparse.Namespace) -> None:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + ns.budget
    for name in ns.rows:
        if name not in ROWS:
            sys.exit(f"unknown row {name!r}; see: python bench/finetune_memory.py list")
        left = deadline - time.monotonic()
        if left < 30:
            print(f"{name}: skipped, the call's budget is spent", flush=True)
            continue
        row = run_row(name, out, ns.extra or [], min(ns.row_timeout, left))
        m = row.get("metrics", {})
        print(f"{name}: exit {row['exit']} oom {row['oom']} {row['seconds']:.0f}s "
              f"est {m.get('mem.est_peak_gb', float('nan')):.2f} GB "
              f"measured {m.get('mem.measured_peak_gb', m.get('mem.measured_peak_growth_gb', float('nan'))):.2f} "
              f"err {m.get('mem.est_error_pct', float('nan')):+.1f}% "
              f"loss {[round(x, 3) for x in row.get('train', {}).get('losses', [])]}", flush=True)  # fmt: skip


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def cmd_report(ns: argparse.Namespace) -> None:
    rows = []
    for folder in ns.folders:
        rows += [json.loads(p.read_text()) for p in sorted(Path(folder, "rows").glob("*.json"))]
    header = result_header(command="python bench/finetune_memory.py report " + " ".join(ns.folders))
    result = {**header, "rows": rows}
    lines = markdown_heading("Does fine-tuning fit? Estimate vs measured per phase", result)
    lines += [
        "| row | est peak GB | measured peak GB | err | est total / NVML GB | err | forward / backward / optimizer err | loss by step | verdict for the card | ran | DeepSpeed ZeRO-2 | accelerate Adam | 16 B/param |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        m, a = row.get("metrics", {}), row.get("anchors", {})
        est = row.get("estimate", {})
        ran = (
            "OOM"
            if row.get("oom")
            else ("ran" if row.get("exit") == 0 else f"exit {row.get('exit')}")
        )
        fits = (row.get("card") or {}).get("fits")
        verdict = "—" if fits is None else ("fits" if fits else "does not fit")
        phases = " / ".join(_fmt(m.get(f"mem.{k}_error_pct"), "+.1f") for k in
                            ("forward", "backward", "optimizer_step"))  # fmt: skip
        measured = m.get("mem.measured_peak_gb", m.get("mem.measured_peak_growth_gb"))
        losses = ", ".join(f"{x:.3f}" for x in row.get("train", {}).get("losses", []))
        lines.append(
            f"| {row['row']} | {_fmt(est.get('peak_gb'))} | {_fmt(measured)} | "
            f"{_fmt(m.get('mem.est_error_pct'), '+.1f')} % | {_fmt(est.get('total_gb'))} / "
            f"{_fmt(m.get('mem.nvml_process_gb'))} | {_fmt(m.get('mem.est_total_error_pct'), '+.1f')} % | "
            f"{phases} | {losses} | {verdict} | {ran} | {_fmt(a.get('deepspeed_zero2_gb'))} | "
            f"{_fmt(a.get('accelerate_adam_gb'))} | {_fmt(a.get('rule16_gb'))} |"
        )  # fmt: skip
    lines += ["", "CPU rows measure the resident set's growth over the loaded model (the estimate "
              "less its loaded weights); GPU rows the torch allocator's peak from step 2 on, and "
              "NVML's view of the process. Raw numbers: the .json beside this file."]  # fmt: skip
    stem = ns.stem or f"finetune_{card_slug(header['device'])}"
    print(*write_result(stem, result, lines, Path(ns.out)), sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("out")
    run.add_argument("--rows", nargs="+", required=True)
    run.add_argument("--extra", nargs="*", help="overrides added to every row")
    run.add_argument("--row-timeout", type=float, default=300)
    run.add_argument("--budget", type=float, default=520, help="seconds for all the rows")
    rep = sub.add_parser("report")
    rep.add_argument("folders", nargs="+")
    rep.add_argument("--out", default=str(Path(__file__).parent / "results"))
    rep.add_argument("--stem")
    sub.add_parser("list")
    ns = parser.parse_args()
    if ns.cmd == "list":
        for name, args in ROWS.items():
            print(name, " ".join(args))
    elif ns.cmd == "run":
        cmd_run(ns)
    else:
        cmd_report(ns)


if __name__ == "__main__":
    main()
