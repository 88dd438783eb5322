"""Does fine-tuning fit? The measured table of issue 32: each row a real `pipeline=finetune` run
(env_check → memory_budget → quantize → load → train, the stages a user's command runs), its
phases' measured peaks against qpipe's estimate, qpipe's verdict for the card beside whether
the row ran or ran out of memory, and what DeepSpeed's estimator, accelerate's estimate-memory
and the 16-bytes-a-parameter rule say for the same model.

    python bench/finetune_memory.py run OUT --group qwen      # one GPU call: its rows, one process
    python bench/finetune_memory.py run OUT --rows tiny_lora tiny_full8     # chosen rows
    python bench/finetune_memory.py plan --group qwen --set hardware=h100_80gb  # estimates only
    python bench/finetune_memory.py report OUT1 OUT2 --stem finetune_h100   # the result files
    python bench/finetune_memory.py list

The rows of a group share one process (imports, the random model's folder, the QLoRA base
quantized once); each row loads its model afresh, and between rows the process gives the
allocator's cache back (gc, empty_cache) and records what stays allocated, so that every row's
allocator peak and NVML total start from the same floor. A row that runs out of memory is a
result ("does not fit"): rows run with hardware.memory_gb=1000 so that qpipe's own budget does
not stop them, and qpipe's verdict for the real card is its estimate against that card's usable
memory. Each finished row is one line of OUT/rows.jsonl, written as it ends (a call cut short
keeps the rows done); OUT/rows.jsonl's first line is the device and versions it ran with.

ZeRO-2 with the optimizer in host memory (one GPU) is DeepSpeed's engine over qpipe's own
ds_config.json, on Qwen3-8B's architecture cut to 8 layers (its full model's 16 bytes a
parameter of host memory would not fit the machine's 128 GiB); DeepSpeed's CPU Adam is built
in the background from the call's start (TORCH_EXTENSIONS_DIR), and the row says when it did
not build.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import card_slug, markdown_heading, result_header, write_result  # noqa: E402

QWEN = ["model=qwen3_8b", "model.weights=random", "workload.context_len=2048"]
QWEN_8L = QWEN + ["model.config.num_hidden_layers=8", "model.name=qwen3-8b-8layers"]
INTERNVL = ["model=internvl", "model.weights=random", "workload.context_len=2048"]
SMOL = ["model=smollm2", "workload.context_len=2048"]
TINY = ["model=tiny_llama", "workload.context_len=128"]
BIG_CARD = ["hardware.memory_gb=1000"]  # measure what the verdict refuses: an OOM is a result
METHODS = {
    "lora": ["finetune.method=lora", "finetune.precision=mixed"],
    "qlora": ["finetune.method=qlora", "quant=bnb_nf4", "finetune.precision=mixed"],
    "full8": ["finetune.method=full", "finetune.optimizer=adamw_8bit", "finetune.precision=bf16"],
    "full": ["finetune.method=full", "finetune.precision=mixed"],
}
CPU_METHODS = {  # the CPU trains in fp32 (precision auto)
    "lora": ["finetune.method=lora"],
    "full": ["finetune.method=full"],
    "full8": ["finetune.method=full", "finetune.optimizer=adamw_8bit"],
    "qlora": ["finetune.method=qlora", "quant=bnb_nf4"],
}


@dataclass(frozen=True)
class Row:
    name: str
    group: str
    overrides: list[str]
    seconds: float  # what the row needs, roughly, on an H100 (skipped when less is left)
    engine: str = "qpipe"  # qpipe (pipeline=finetune) | deepspeed (ZeRO-2 over qpipe's plan)


def _ckpt(on: bool) -> list[str]:
    return [f"finetune.gradient_checkpointing={str(on).lower()}"]


def _rows() -> dict[str, Row]:
    rows: list[Row] = []
    # call 1: Qwen3-8B (random weights), batch 1 first (each method, with and without
    # checkpointing), then batch 4 with checkpointing, then batch 4 without (on an H100 these
    # are qpipe's "does not fit" rows: their OOM is the proof, and comes in seconds)
    methods = ("lora", "qlora", "full8")
    order = [(1, m, c) for m in methods for c in (True, False)]
    order += [(4, m, True) for m in methods] + [(4, m, False) for m in methods]
    for batch, method, ckpt in order:
        name = f"qwen_{method}_b{batch}" + ("_ckpt" if ckpt else "")
        over = QWEN + METHODS[method] + _ckpt(ckpt) + [f"workload.batch_size={batch}"]
        rows.append(Row(name, "qwen", over + BIG_CARD, 45 if batch == 1 else 35))
    # call 2: InternVL3.5-8B (vision tower frozen), SmolLM2's real weights, ZeRO-2 offload
    for method in ("lora", "qlora"):
        over = INTERNVL + METHODS[method] + ["workload.batch_size=1"] + BIG_CARD
        rows.append(Row(f"internvl_{method}_b1", "vlm_smol", over, 90))
    for method in ("full", "lora", "qlora"):
        over = SMOL + METHODS[method] + ["workload.batch_size=4"] + BIG_CARD
        rows.append(Row(f"smollm2_{method}_b4", "vlm_smol", over, 25))
    zero2 = ["finetune.method=full", "finetune.precision=mixed", "finetune.sharding=zero2",
             "finetune.offload_optimizer=true", "workload.batch_size=1"]  # fmt: skip
    rows.append(Row("qwen8l_zero2_offload_b1_ckpt", "vlm_smol",
                    QWEN_8L + zero2 + _ckpt(True) + BIG_CARD, 120, "deepspeed"))  # fmt: skip
    # CPU: SmolLM2's real weights, host memory (bench/results/finetune_cpu.*)
    cpu = ["model=smollm2", "workload.context_len=256", "workload.batch_size=2"]
    for method in ("lora", "full", "full8"):
        rows.append(Row(f"cpu_smollm2_{method}", "cpu", cpu + CPU_METHODS[method], 120))
    # the scripts' own check on CPU: tiny models through every path (seconds each)
    for method in ("lora", "full8", "qlora"):
        rows.append(Row(f"tiny_{method}", "tiny", TINY + CPU_METHODS[method], 10))
    rows.append(
        Row(
            "tiny_internvl_lora",
            "tiny",
            ["model=tiny_internvl", "workload.context_len=64", "finetune.method=lora"],
            10,
        )
    )
    rows.append(Row("tiny_zero2_offload", "tiny", TINY + zero2 + _ckpt(True), 10, "deepspeed"))
    return {r.name: r for r in rows}


ROWS = _rows()
GROUPS = sorted({r.group for r in ROWS.values()})


# ---------------------------------------------------------------------- one row, in process


def compose(overrides: list[str]) -> Any:
    """The config ``python -m qpipe <overrides>`` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qpipe.config.compose import CONF_DIR, normalize_overrides

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=normalize_overrides(list(overrides)))


def run_pipeline(overrides: list[str], run_dir: Path) -> Any:
    """qpipe's pipeline in this process, as the CLI runs it but without MLflow (the rows'
    numbers go to rows.jsonl): validated settings, the DAG, the runner."""
    from qpipe.config.safety import policy_from, set_policy
    from qpipe.dag import load_dag, pipeline_ref
    from qpipe.preflight import validate_config
    from qpipe.runner import Runner

    cfg = compose(overrides)
    settings = validate_config(cfg)
    set_policy(policy_from(cfg.model))
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, Runner(cfg, load_dag(pipeline_ref(cfg)), run_dir, None, settings).run()


def _floor() -> dict[str, float]:
    """Between rows: the allocator's cache given back; what stays allocated (and NVML's view
    of the process) is the floor the next row starts from."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    from qpipe.devices.envinfo import nvml_process_used_gb

    return {
        "allocated_gb": torch.cuda.memory_allocated() / 1e9,
        "reserved_gb": torch.cuda.memory_reserved() / 1e9,
        "nvml_gb": nvml_process_used_gb(0) or 0.0,
    }


def _card_verdict(env: dict, headroom_pct: float, est_total: float | None) -> dict:
    """qpipe's verdict for the card the row ran on (the run itself planned a 1000 GB card):
    its estimate against that card's usable memory, as hardware=auto would have judged."""
    card = env.get("gpu_memory_gb")
    if card is None or est_total is None:
        return {"card_gb": card, "fits": None}
    usable = float(card) * (1 - headroom_pct / 100)
    return {"card_gb": card, "usable_gb": usable, "fits": est_total <= usable}


def run_row(row: Row, runs: Path) -> dict[str, Any]:
    floor = _floor()
    start = time.perf_counter()
    record: dict[str, Any] = {"row": row.name, "group": row.group, "args": row.overrides,
                              "engine": row.engine, "floor": floor}  # fmt: skip
    pipeline = "pipeline=estimate" if row.engine == "deepspeed" else "pipeline=finetune"
    extra = ["workload.mode=finetune"] if row.engine == "deepspeed" else []
    try:
        cfg, report = run_pipeline([pipeline, *row.overrides, *extra], runs / row.name)
    except Exception as err:  # a config error or a crash outside the runner: the row says so
        record.update(status="ERROR", error=f"{type(err).__name__}: {err}"[:2000],
                      seconds=time.perf_counter() - start)  # fmt: skip
        return record
    budget = report.results.get("memory_budget")
    env = report.results["env_check"].outputs if "env_check" in report.results else {}
    record.update(
        status=report.status,
        failed_stage=report.failed_stage,
        error=(report.error or "")[:2000] or None,
        metrics=report.metrics,
        env={k: env.get(k) for k in ("gpu_name", "gpu_memory_gb", "cuda_context_gb", "driver")},
    )
    if budget is not None:
        est = budget.outputs["estimate"]
        record["estimate"] = est
        record["train_estimate"] = budget.outputs.get("train_estimate")
        record["verdict_line"] = budget.outputs.get("verdict")
        record["card"] = _card_verdict(env, float(cfg.hardware.headroom_pct), est["total_gb"])
        record["params_b"] = report.metrics.get("model.params_b")
    if "train" in report.results:
        record["train"] = report.results["train"].outputs
    if row.engine == "deepspeed" and report.status == "FINISHED" and budget is not None:
        record["measured"] = deepspeed_steps(cfg, budget.outputs)
    error = " ".join(str(x) for x in (record.get("error"), record.get("measured", {}).get("error")))
    record["oom"] = "out of memory" in error.lower()
    record["seconds"] = time.perf_counter() - start
    del report
    return record


# ---------------------------------------------------------------------- ZeRO-2, DeepSpeed


BUILD_CPU_ADAM = (
    "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); print('built')"
)


def start_cpu_adam_build(log: Path) -> subprocess.Popen | None:
    """DeepSpeed's CPU Adam (the optimizer of ZeRO-Offload) compiled in the background while
    the other rows run; None where there is no CUDA (the CPU check prices the row only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_extensions")
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-c", BUILD_CPU_ADAM], stdout=handle,
                            stderr=subprocess.STDOUT, env=os.environ.copy())  # fmt: skip


_BUILD: dict[str, Any] = {}


def _cpu_adam_ready(timeout: float) -> str | None:
    """None once DeepSpeed's CPU Adam is built; else why not."""
    proc = _BUILD.get("proc")
    if proc is None:
        return "no CUDA here: the row is priced, not run"
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        return f"DeepSpeed's CPU Adam did not build within {timeout:.0f} s"
    if code != 0:
        tail = Path(_BUILD["log"]).read_text()[-1500:]
        return f"DeepSpeed's CPU Adam did not build (exit {code}): {tail}"
    return None


def deepspeed_steps(cfg: Any, budget: dict) -> dict[str, Any]:
    """ZeRO-2 with the optimizer in host memory, on this one GPU: DeepSpeed's engine built from
    qpipe's ds_config.json, three steps on real text, each phase measured as the train stage
    measures it (allocator peak and NVML from step 2 on), and the host's resident set."""
    ds_file = next(Path(p) for p in budget["plan_files"] if p.endswith("ds_config.json"))
    why_not = _cpu_adam_ready(float(os.environ.get("CPU_ADAM_WAIT_S", 150)))
    if why_not:
        return {"error": why_not, "ds_config": json.loads(ds_file.read_text())}
    try:
        return _deepspeed_steps(cfg, json.loads(ds_file.read_text()))
    except Exception as err:
        return {
            "error": f"{type(err).__name__}: {err}"[:1500],
            "trace": traceback.format_exc()[-3000:],
        }


def _deepspeed_steps(cfg: Any, ds_config: dict) -> dict[str, Any]:
    import deepspeed
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from qpipe.corpora.texts import read_text, token_ids
    from qpipe.devices.measure import PhaseMeter, _host_peak_bytes, _reset_host_peak
    from qpipe.models import load_tokenizer, materialize

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # fmt: skip
        os.environ.setdefault(key, value)
    folder = materialize(cfg.model)
    host_before = psutil.Process().memory_info().rss
    _reset_host_peak()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.config.use_cache = False
    if cfg.finetune.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    deepspeed.init_distributed()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config)  # fmt: skip
    batch, seq = int(cfg.workload.batch_size), int(cfg.workload.context_len)
    tokenizer = load_tokenizer(cfg.model, folder)
    ids = token_ids(tokenizer, read_text("eval_gpl3.txt"), batch * seq).view(batch, seq).cuda()
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
        losses.append(float(loss.detach()))
    host_peak = (_host_peak_bytes() or psutil.Process().memory_info().rss) - host_before
    out = {"engine": "deepspeed", "losses": losses, "peaks_gb": dict(meter.peaks),
           "nvml_gb": dict(meter.nvml), "host_growth_gb": host_peak / 1e9}  # fmt: skip
    del engine, model
    return out


# ---------------------------------------------------------------------- the commands


def _line(record: dict) -> str:
    m, est = record.get("metrics") or {}, dict(record.get("estimate") or {})
    measured = m.get("mem.measured_peak_gb", m.get("mem.measured_peak_growth_gb"))
    if "mem.measured_peak_growth_gb" in m:  # CPU: growth over the trainable model
        est["peak_gb"] = max(record["train"]["estimated_gb"].values())
    if record.get("measured", {}).get("peaks_gb"):
        measured = max(record["measured"]["peaks_gb"].values())
    losses = (record.get("train") or record.get("measured") or {}).get("losses", [])
    verdict = (record.get("card") or {}).get("fits")
    ran = "OOM" if record.get("oom") else record.get("status")
    return (
        f"{record['row']}: {ran} in {record.get('seconds', 0):.0f}s; est peak "
        f"{est.get('peak_gb', float('nan')):.2f} GB, measured {measured or float('nan'):.2f}, err "
        f"{m.get('mem.est_error_pct', float('nan')):+.1f}%, NVML err "
        f"{m.get('mem.est_total_error_pct', float('nan')):+.1f}%; verdict "
        f"{'—' if verdict is None else ('fits' if verdict else 'does not fit')}; loss "
        f"{[round(x, 3) for x in losses]}; floor {record.get('floor')}"
        + (f"; {str(record.get('error'))[:300]}" if record.get("error") else "")
        + (f"; {record['measured']['error'][:300]}" if record.get("measured", {}).get("error") else "")
    )  # fmt: skip


def _chosen(ns: argparse.Namespace) -> list[Row]:
    names = list(ns.rows or [])
    if ns.group:
        if ns.group not in GROUPS:
            sys.exit(f"unknown group {ns.group!r}; use one of {', '.join(GROUPS)}")
        names += [r.name for r in ROWS.values() if r.group == ns.group]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        sys.exit(f"unknown rows {unknown}; see: python bench/finetune_memory.py list")
    return [ROWS[n] for n in names]


def _missing(row: Row) -> str | None:
    """Why a row cannot run here (SmolLM2's real weights not assembled on the GPU), or None."""
    import importlib.util

    if "model=smollm2" not in row.overrides:
        return None
    gguf = compose(["model=smollm2"]).model.gguf
    spec = importlib.util.find_spec(gguf.package)
    folders = (spec.submodule_search_locations or []) if spec else []
    if not any(Path(folder, gguf.file).is_file() for folder in folders):
        return "SmolLM2's GGUF is not here (on the GPU: call 1's part did not stay for call 2)"
    return None


def cmd_run(ns: argparse.Namespace) -> None:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _chosen(ns)
    deadline = time.monotonic() + ns.budget
    runs = Path(ns.runs)
    if any(r.engine == "deepspeed" for r in rows):
        _BUILD["log"] = out / "cpu_adam_build.log"
        _BUILD["proc"] = start_cpu_adam_build(_BUILD["log"])
    with (out / "rows.jsonl").open("a") as sink:
        import torch

        header = result_header(threads=torch.get_num_threads(), load_avg=os.getloadavg())
        sink.write(json.dumps({"header": header}) + "\n")
        for row in rows:
            left = deadline - time.monotonic()
            missing = _missing(row)
            if missing:
                record = {"row": row.name, "group": row.group, "args": row.overrides,
                          "status": "SKIPPED", "error": missing}  # fmt: skip
            elif left < row.seconds:
                record = {"row": row.name, "group": row.group, "args": row.overrides,
                          "status": "SKIPPED", "error": f"{left:.0f} s left of the call's budget"}  # fmt: skip
            else:
                os.environ["CPU_ADAM_WAIT_S"] = str(max(left - 60, 1))
                record = run_row(row, runs)
                record["overrides"] = ns.set or []
            sink.write(json.dumps(record, default=str) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            print(_line(record), flush=True)


def cmd_plan(ns: argparse.Namespace) -> None:
    """Estimates only (pipeline=estimate, meta device): what each row will take on a card."""
    for row in _chosen(ns):
        over = [o for o in row.overrides if o not in BIG_CARD] + (ns.set or [])
        cfg, report = run_pipeline(["pipeline=estimate", "workload.mode=finetune", *over],
                                   Path(ns.runs) / ("plan-" + row.name))  # fmt: skip
        budget = report.results.get("memory_budget")
        est = budget.outputs["estimate"] if budget else {}
        print(f"{row.name}: total {est.get('total_gb', float('nan')):.2f} GB "
              f"({'fits' if budget and budget.outputs.get('fits') else 'does not fit'} "
              f"{cfg.hardware.name}){'' if budget else ' ' + str(report.error)}", flush=True)  # fmt: skip


# ---------------------------------------------------------------------- the result files


def anchors(params: int) -> dict[str, float]:
    """What the tools people use say for the same model (model states only, batch 1):
    DeepSpeed ZeRO-2 on one GPU without offload (every parameter trainable), accelerate's
    "Training using Adam" for bf16, and 16 bytes a parameter."""
    out: dict[str, Any] = {"rule16_gb": 16 * params / 1e9}
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(params, 1, 1, cpu_offload=False)
        out["deepspeed_zero2_gb"] = gpu / 1e9
    except Exception as err:  # not installed where the report runs: it says so
        out["deepspeed_error"] = str(err)[:200]
    try:
        from accelerate.commands.estimate import estimate_training_usage

        sizes = estimate_training_usage(4 * params, "bfloat16")  # accelerate builds it in fp32
        out["accelerate_adam_gb"] = max(sizes.values()) / 1e9
    except Exception as err:
        out["accelerate_error"] = str(err)[:200]
    return out


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def verdict_check(record: dict) -> str:
    """Right when qpipe said "fits" and the row ran, or "does not fit" and it ran out of
    memory; a row that failed otherwise, or was not run, proves neither."""
    fits = (record.get("card") or {}).get("fits")
    ran = record.get("status") == "FINISHED" and not record.get("measured", {}).get("error")
    if fits is None or not (ran or record.get("oom")):
        return "—"
    if fits and ran:
        return "right"
    if not fits and record.get("oom"):
        return "right"
    return "WRONG: fits but ran out of memory" if fits else "wrong (cautious): ran"


def _row_cells(r: dict) -> list[str]:
    m, est, a = r.get("metrics") or {}, r.get("estimate") or {}, r.get("anchors") or {}
    gpu = bool(m.get("mem.measured_peak_gb")) or bool((r.get("measured") or {}).get("peaks_gb"))
    if r.get("measured", {}).get("peaks_gb"):  # DeepSpeed's engine: its own phases
        peaks, est_phases = r["measured"]["peaks_gb"], est.get("phases_gb", {})
        measured = max(peaks.values())
        errs = [(est_phases[p] - peaks[p]) / peaks[p] * 100 for p in peaks if peaks[p] > 0]
        err_phases = " / ".join(f"{e:+.1f}" for e in errs)
        err_peak = (est.get("peak_gb", 0) - measured) / measured * 100
        nvml = max(r["measured"].get("nvml_gb", {}).values(), default=None)
        err_total = (est["total_gb"] - nvml) / nvml * 100 if nvml else None
        losses = r["measured"].get("losses", [])
    else:
        measured = m.get("mem.measured_peak_gb", m.get("mem.measured_peak_growth_gb"))
        err_phases = " / ".join(_fmt(m.get(f"mem.{k}_error_pct"), "+.1f")
                                for k in ("forward", "backward", "optimizer_step"))  # fmt: skip
        err_peak, nvml = m.get("mem.est_error_pct"), m.get("mem.nvml_process_gb")
        err_total = m.get("mem.est_total_error_pct")
        losses = (r.get("train") or {}).get("losses", [])
    est_peak = (
        est.get("peak_gb")
        if gpu
        else max((r.get("train") or {}).get("estimated_gb", {}).values(), default=None)
    )
    ran = "OOM" if r.get("oom") else ("ran" if r.get("status") == "FINISHED" else r.get("status"))
    if r.get("engine") == "deepspeed" and not r.get("oom"):
        ran = "ran" if (r.get("measured") or {}).get("peaks_gb") else "not run"
    fits = (r.get("card") or {}).get("fits")
    verdict = "—" if fits is None else ("fits" if fits else "does not fit")
    shape = f"{r.get('train', {}).get('batch_size', '')}×{r.get('train', {}).get('seq_len', '')}"
    return [
        r["row"], shape if r.get("train") else "", _fmt(est_peak), _fmt(measured),
        _fmt(err_peak, "+.1f"), _fmt(est.get("total_gb") if gpu else None), _fmt(nvml),
        _fmt(err_total, "+.1f"), err_phases, ", ".join(f"{x:.3f}" for x in losses), verdict, ran,
        verdict_check(r), _fmt(a.get("deepspeed_zero2_gb")), _fmt(a.get("accelerate_adam_gb")),
        _fmt(a.get("rule16_gb")),
    ]  # fmt: skip


def cmd_report(ns: argparse.Namespace) -> None:
    rows, headers = [], []
    for folder in ns.folders:
        for line in Path(folder, "rows.jsonl").read_text().splitlines():
            data = json.loads(line)
            if "header" in data:
                headers.append(data["header"])
                continue
            params = int((data.get("params_b") or 0) * 1e9)
            if params:
                data["anchors"] = anchors(params)
            rows.append(data)
    latest: dict[str, dict] = {}
    for row in rows:  # a row run again (a later call) replaces the earlier
        if row.get("status") != "SKIPPED" or row["row"] not in latest:
            latest[row["row"]] = row
    ran_on = headers[-1] if headers else result_header()
    result = {
        **ran_on,
        "command": " && ".join(dict.fromkeys(h["command"] for h in headers)) or ran_on["command"],
        "report_command": "python bench/finetune_memory.py report " + " ".join(ns.folders),
        "calls": headers,
        "rows": list(latest.values()),
    }
    cpu = ran_on["device"].get("count", 0) == 0
    what = "host RSS growth over the trainable model" if cpu else "torch allocator peak"
    lines = markdown_heading("Does fine-tuning fit? Estimate vs measured per phase", result)
    cards = {h["device"]["name"] for h in headers}
    lines += [f"Calls ({len(headers)}): " + "; ".join(
        f"{h['device']['name']}, {h['date']}: `{h['command']}`" for h in headers
    ) + (" — **rows from different cards**: compare within a card" if len(cards) > 1 else ""), ""]  # fmt: skip
    lines += [
        f"| row | batch×seq | est peak GB | measured peak GB ({what}) | err % | est total GB | NVML GB | err % | forward / backward / optimizer err % | loss by step | qpipe's verdict for the card | ran | verdict right? | DeepSpeed ZeRO-2 GB | accelerate Adam GB | 16 B/param GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in latest.values()]
    grown = [
        r for r in latest.values() if "mem.measured_trainable_growth_gb" in (r.get("metrics") or {})
    ]
    if grown:  # CPU: what the baseline holds beyond the weights, measured, not priced
        lines += ["", "| row | made trainable: est / measured GB (adapters; peft's wrapper) | "
                  "warm-up left GB (libraries' first use) | threads | load avg |", "|---|---|---|---|---|"]  # fmt: skip
        for r in grown:
            m = r["metrics"]
            lines.append(f"| {r['row']} | {m['mem.est_trainable_growth_gb']:.4f} / "
                         f"{m['mem.measured_trainable_growth_gb']:.4f} | "
                         f"{m['mem.measured_warmup_growth_gb']:.4f} | {ran_on.get('threads', '—')} | "
                         f"{', '.join(f'{x:.1f}' for x in ran_on.get('load_avg', []))} |")  # fmt: skip
    notes = [r for r in latest.values() if r.get("error") or (r.get("measured") or {}).get("error")]
    if notes:
        lines += ["", "Rows that did not finish:", ""]
        lines += [
            f"- {r['row']}: {str(r.get('error') or r['measured']['error'])[:400]}" for r in notes
        ]
    lines += ["", (
        "CPU rows: the resident set's growth from step 2 on, over the model as made trainable "
        "and one warm-up step at the same shape, against the estimate less the weights and "
        "adapters. GPU rows: the torch allocator's peak from step 2 on (absolute), and NVML's "
        "view of the process against the estimate plus the measured CUDA context. Anchors: "
        "model states only, batch 1, every parameter trainable. Raw numbers: the .json beside "
        "this file."
    )]  # fmt: skip
    stem = ns.stem or f"finetune_{card_slug(ran_on['device'])}"
    print(*write_result(stem, result, lines, Path(ns.out)), sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "plan"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("out")
            p.add_argument("--budget", type=float, default=450, help="seconds for all the rows")
        p.add_argument("--group", help=f"one of {', '.join(GROUPS)}")
        p.add_argument("--rows", nargs="*")
        p.add_argument("--set", nargs="*", help="overrides added to every row")
        p.add_argument("--runs", default=os.environ.get("FT_RUNS", "/tmp/finetune_runs"))
    rep = sub.add_parser("report")
    rep.add_argument("folders", nargs="+")
    rep.add_argument("--out", default=str(Path(__file__).parent / "results"))
    rep.add_argument("--stem")
    sub.add_parser("list")
    ns = parser.parse_args()
    if ns.cmd == "list":
        for row in ROWS.values():
            print(f"{row.group:9s} {row.name:32s} {' '.join(row.overrides)}")
    elif ns.cmd == "run":
        if ns.set:
            for row in _chosen(ns):
                ROWS[row.name] = Row(row.name, row.group, row.overrides + ns.set, row.seconds,
                                     row.engine)  # fmt: skip
        cmd_run(ns)
    elif ns.cmd == "plan":
        cmd_plan(ns)
    else:
        cmd_report(ns)


if __name__ == "__main__":
    main()
