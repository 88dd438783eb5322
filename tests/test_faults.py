"""The fault-injection suite: each fault is made to happen inside a real qpipe run (a real
SIGKILL, Ctrl-C, file size limit, dying MLflow server, damaged checkpoint and cache, bad
config), and what qpipe promises is checked: a known final state with the failed stage and a
one-line reason, nothing half-written reused, the next run going on.

``QPIPE_FAULTS_RESULTS=bench/results python -m pytest -q tests/test_faults.py`` also writes
bench/results/faults.{json,md}.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from qpipe.app import run_pipeline
from qpipe.config.safety import LoadPolicy, set_policy
from qpipe.dag import load_dag
from qpipe.errors import CheckpointError, DiskFull, UnsafeCheckpoint
from qpipe.models import load_tokenizer, materialize
from qpipe.models.checkpoints import INDEX, inspect_checkpoint
from qpipe.store.diskspace import ensure_space, free_bytes
from qpipe.tracking.runs import default_tracking_uri
from qpipe.tracking.stale_runs import close_dead_runs
from tests.conftest import cli_in_process, compose_config, save_random_llama
from tests.faults_support import (
    LOG,
    QUANTIZE_LOAD_DAG,
    RESULTS_ENV,
    TINY,
    env_for,
    error_lines,
    finish,
    mlflow_run,
    run_qpipe,
    start_qpipe,
    wait_for,
)

pytestmark = pytest.mark.slow

# Does-it-fit only: for faults found before any weight is loaded.
ESTIMATE = ("model=tiny_llama", "quant=none", "pipeline=estimate", "mlflow.experiment=faults")


@pytest.fixture(scope="module", autouse=True)
def fault_log():
    yield LOG
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        LOG.write(Path(folder))


@pytest.fixture(scope="module")
def tiny_ready(outputs_dir: Path) -> Path:
    """tiny_llama's weights and borrowed tokenizer made once, before any fault is armed."""
    cfg = compose_config(*TINY)
    materialize(cfg.model)
    load_tokenizer(cfg.model)
    return outputs_dir


@pytest.fixture(scope="module")
def quantize_load_dag(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("dag") / "quantize_load.yaml"
    path.write_text(QUANTIZE_LOAD_DAG)
    return str(path)


def _fresh_quantize_cache(outputs: Path) -> None:
    """The fault must hit a quantize that really runs, not a result cached by an earlier run
    of the suite on the same outputs folder."""
    shutil.rmtree(outputs / "cache" / "stages" / "quantize", ignore_errors=True)


def _partials(outputs: Path) -> list[Path]:
    return sorted((outputs / "cache").rglob("*.partial"))


def _one_line(text: str) -> str:
    lines = error_lines(text)
    assert len(lines) == 1, f"expected one error line, got {lines}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    return lines[0].strip()


# -- SIGKILL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "spec", "key"),
    [
        (
            "SIGKILL during quantize",
            {"at": "qpipe.kernels.quant_linear:QuantLinear.from_linear", "call": 5},
            "quant.group_size=32",
        ),
        (
            "SIGKILL while writing the checkpoint",
            {"at": "transformers.modeling_utils:safe_save_file", "call": 1},
            "quant.group_size=16",
        ),
    ],
)
def test_sigkill_then_rerun_recomputes_and_marks_the_dead_run_killed(
    fault, spec, key, tiny_ready, quantize_load_dag, tmp_path
) -> None:
    _fresh_quantize_cache(tiny_ready)
    action = "sigkill" if "quantize" in fault else "truncate_then_sigkill"
    overrides = [*TINY, key, f"pipeline={quantize_load_dag}"]
    run_dir = tmp_path / "killed"
    proc = run_qpipe(
        {**spec, "action": action},
        [*overrides, f"hydra.run.dir={run_dir}"],
        env_for(tiny_ready),
    )
    assert proc.returncode == -signal.SIGKILL, proc.output[-3000:]
    uri = default_tracking_uri()
    dead = mlflow_run(uri, run_dir)
    assert dead.info.status == "RUNNING"  # nobody closed it: the process is gone
    assert dead.data.tags["qpipe.stage"] == "quantize"
    partials = _partials(tiny_ready)
    assert partials, "the kill should have left the stage's partial folder behind"
    assert not (partials[0] / "result.json").exists()

    # The next start: the dead run is marked, the partial folder is never used.
    start = time.perf_counter()
    closed = close_dead_runs(uri)
    marked_s = time.perf_counter() - start
    assert dead.info.run_id in closed
    after = MlflowClient(uri).get_run(dead.info.run_id)
    assert after.info.status == "KILLED"
    assert after.data.tags["qpipe.failed_stage"] == "quantize"
    journal = json.loads((run_dir / "run.json").read_text())
    assert journal["status"] == "KILLED"

    rerun = run_pipeline(compose_config(*overrides), tmp_path / "rerun")
    assert rerun.status == "FINISHED", rerun.error
    assert rerun.params["cache.quantize"] == "miss"
    checkpoint = rerun.results["quantize"].outputs["checkpoint"]
    assert ".partial" not in checkpoint and not _partials(tiny_ready)
    LOG.add(
        fault=fault,
        injected=f"SIGKILL from inside {spec['at'].split(':')[1]} (call {spec['call']})"
        + (", file cut to half first" if "write" in fault else ""),
        outcome=after.data.tags["qpipe.failure"],
        final_state=f"KILLED at quantize (marked by the next start in {marked_s:.2f} s); "
        "rerun FINISHED, quantize recomputed",
        time_to_error_s=None,
        lost="the killed stage's work (recomputed; the partial folder was never read)",
        kept=True,
    )


# -- Ctrl-C ------------------------------------------------------------------------------


def test_ctrl_c_marks_the_run_killed_removes_partial_output_exits_130(
    tiny_ready, quantize_load_dag, tmp_path
) -> None:
    _fresh_quantize_cache(tiny_ready)
    marker = tmp_path / "in_quantize"
    run_dir = tmp_path / "interrupted"
    overrides = [*TINY, "quant.group_size=128", f"pipeline={quantize_load_dag}"]
    spec = {
        "at": "qpipe.kernels.quant_linear:QuantLinear.from_linear",
        "call": 3,
        "action": "signal_ready",
        "marker": str(marker),
        "sleep": 120,
    }
    started = time.perf_counter()
    proc = start_qpipe(spec, [*overrides, f"hydra.run.dir={run_dir}"], env_for(tiny_ready))
    wait_for(marker, proc)
    assert _partials(tiny_ready), "quantize should be writing into its partial folder"
    sent = time.perf_counter()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    result = finish(proc, started, timeout=120)
    stopped_s = time.perf_counter() - sent
    assert result.returncode == 130, result.output[-3000:]
    line = _one_line(result.output)
    assert "interrupted (SIGINT)" in line
    assert not _partials(tiny_ready)
    run = mlflow_run(default_tracking_uri(), run_dir)
    assert run.info.status == "KILLED"
    assert run.data.tags["qpipe.failed_stage"] == "quantize"
    assert "SIGINT" in run.data.tags["qpipe.failure"]
    LOG.add(
        fault="Ctrl-C (SIGINT to the process group)",
        injected="SIGINT while quantize runs",
        outcome=line,
        final_state="KILLED at quantize, exit code 130",
        time_to_error_s=stopped_s,
        lost="the interrupted stage's work; its partial folder removed",
        kept=True,
    )


# -- disk full ---------------------------------------------------------------------------


def test_disk_full_while_writing_the_checkpoint(tiny_ready, quantize_load_dag, tmp_path) -> None:
    _fresh_quantize_cache(tiny_ready)
    db = tiny_ready / "mlflow.db"
    limit = (db.stat().st_size if db.exists() else 0) + 30 * 2**20
    run_dir = tmp_path / "diskfull"
    overrides = [*TINY, "quant.group_size=64", "seed=11", f"pipeline={quantize_load_dag}"]

    def limited() -> None:  # the checkpoint (~100 MB) cannot be written; the store can grow
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    started = time.perf_counter()
    proc = start_qpipe(
        None, [*overrides, f"hydra.run.dir={run_dir}"], env_for(tiny_ready), preexec_fn=limited
    )
    result = finish(proc, started)
    assert result.returncode == 1, result.output[-3000:]
    line = _one_line(result.output)
    assert "disk full writing" in line and "checkpoint (file too large)" in line
    assert "checkpoint needs 0.10" in line  # the budget's estimate of the checkpoint
    assert not _partials(tiny_ready)
    run = mlflow_run(default_tracking_uri(), run_dir)
    assert run.info.status == "FAILED" and run.data.tags["qpipe.failed_stage"] == "quantize"
    LOG.add(
        fault="disk full while writing the checkpoint",
        injected=f"RLIMIT_FSIZE {limit / 2**20:.0f} MiB (the checkpoint is ~100 MB)",
        outcome=line,
        final_state="FAILED at quantize",
        time_to_error_s=result.seconds,
        lost="nothing reusable was half-written: the partial checkpoint was removed",
        kept=True,
    )


def test_not_enough_space_is_found_before_writing(tmp_path) -> None:
    needed = free_bytes(tmp_path) + 2**30
    start = time.perf_counter()
    with pytest.raises(DiskFull) as err:
        ensure_space(tmp_path, needed, "the rtn checkpoint")
    assert str(tmp_path) in str(err.value) and "needs" in str(err.value)
    LOG.add(
        fault="not enough free space for a checkpoint",
        injected="a checkpoint 1 GiB larger than the free space of the real filesystem",
        outcome=str(err.value),
        final_state="refused before writing",
        time_to_error_s=time.perf_counter() - start,
        lost="nothing",
        kept=True,
    )


# -- the tracking server dies mid-run ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(folder: Path, port: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
            "--default-artifact-root", str(folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start")


def test_tracking_server_dies_mid_run_results_stay_and_sync_later(
    tiny_ready, quantize_load_dag, tmp_path
) -> None:
    _fresh_quantize_cache(tiny_ready)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path / "server", port)
    marker = tmp_path / "in_quantize"
    run_dir = tmp_path / "offline"
    # A fresh working directory, home and temp folder: qpipe must write under outputs only.
    cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
    for folder in (cwd, home, tmp):
        folder.mkdir()
    spec = {
        "at": "qpipe.kernels.quant_linear:QuantLinear.from_linear",
        "call": 1,
        "action": "signal_ready",
        "marker": str(marker),
        "sleep": 3,
    }
    overrides = [
        *TINY,
        "seed=7",
        f"pipeline={quantize_load_dag}",
        f"mlflow.tracking_uri={uri}",
        f"hydra.run.dir={run_dir}",
    ]
    env = env_for(tiny_ready, HOME=str(home), TMPDIR=str(tmp))
    started = time.perf_counter()
    try:
        proc = start_qpipe(spec, overrides, env, cwd=cwd)
        wait_for(marker, proc)
        os.killpg(server.pid, signal.SIGKILL)
        died = time.perf_counter()
        result = finish(proc, started)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert result.returncode == 0, result.output[-3000:]
    line = _one_line(result.output)
    assert f"python -m qpipe.sync {run_dir}" in line
    journal = json.loads((run_dir / "run.json").read_text())
    assert journal["status"] == "FINISHED"
    assert journal["tracking_offline"]["stage"] == "quantize"
    assert "mem.loaded_weights_gb" in journal["metrics"]  # load ran after the server died
    assert (run_dir / "logged" / "stages" / "load.json").is_file()
    written = [str(p.relative_to(tmp_path)) for f in (cwd, home, tmp) for p in f.rglob("*")]
    assert not written, f"qpipe wrote outside its outputs folder: {written}"

    # The server comes back; the folder is pushed.
    server = _start_server(tmp_path / "server", port)
    try:
        sync = subprocess.run(
            [sys.executable, "-m", "qpipe.sync", str(run_dir)],
            capture_output=True,
            text=True,
            env=env_for(tiny_ready),
            timeout=300,
        )
        assert sync.returncode == 0, sync.stdout + sync.stderr
        run = MlflowClient(uri).get_run(journal["run_id"])
        assert run.info.status == "FINISHED"
        loaded = journal["metrics"]["mem.loaded_weights_gb"]
        assert run.data.metrics["mem.loaded_weights_gb"] == pytest.approx(loaded)
        assert run.data.params["cache.quantize"] == "miss"
        files = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "stages")}
        assert "stages/load.json" in files
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    LOG.add(
        fault="the tracking server dies mid-run",
        injected="SIGKILL to `mlflow server` while quantize runs",
        outcome=line,
        final_state="the pipeline FINISHED; run.json kept it all; `python -m qpipe.sync` "
        f"pushed it ({sync.stdout.strip().splitlines()[-1].split(': ', 1)[-1]})",
        time_to_error_s=result.seconds - (died - started),
        lost="nothing (metrics, params, stage JSON and artifacts pushed by qpipe.sync)",
        kept=True,
    )


# -- corrupt and mismatched checkpoints --------------------------------------------------

_SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def _small_llama(path: Path, **save: object) -> Path:
    if save:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**_SMALL), dtype=torch.float32)
        model.save_pretrained(path, **save)
        return path
    return save_random_llama(path, **_SMALL)


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncated(folder: Path) -> str:
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    return "model.safetensors"


def _hidden_mismatch(folder: Path) -> str:
    _edit_config(folder, hidden_size=128, head_dim=32)
    return "config.json"


def _more_layers(folder: Path) -> str:
    _edit_config(folder, num_hidden_layers=3)
    return "config.json"


def _fewer_layers(folder: Path) -> str:
    _edit_config(folder, num_hidden_layers=1)
    return "config.json"


def _missing_shard(folder: Path) -> str:
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    return shards[1].name


def _qpipe_w4_version(folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    from qpipe.backends.qlinear_loader import save_qpipe_w4
    from qpipe.kernels import QuantLinear

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            model.set_submodule(name, QuantLinear.from_linear(module, group_size=32))
    for p in folder.iterdir():
        p.unlink()
    save_qpipe_w4(model, folder, {"bits": 4, "group_size": 32, "method": "rtn"})
    inspect_checkpoint(folder)  # as written, it is good
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["layout_version"] = 9  # a version from a newer qpipe
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json"


@pytest.mark.parametrize(
    ("fault", "damage", "save", "expect"),
    [
        ("truncated safetensors", _truncated, {}, "is truncated"),
        ("config hidden size ≠ tensors", _hidden_mismatch, {}, "does not match the tensors"),
        ("config has more layers than the tensors", _more_layers, {}, "has no tensor for it"),
        ("config has fewer layers than the tensors", _fewer_layers, {}, "does not have"),
        ("missing shard", _missing_shard, {"max_shard_size": "300KB"}, "is missing"),
        ("qpipe-w4 of another layout version", _qpipe_w4_version, {}, "layout version 9"),
    ],
)
def test_corrupt_or_mismatched_checkpoint_is_named_when_opened(
    fault, damage, save, expect, tmp_path
) -> None:
    folder = _small_llama(tmp_path / "ckpt", **save)
    inspect_checkpoint(folder)  # the undamaged folder passes
    bad_file = damage(folder)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        inspect_checkpoint(folder)
    seconds = time.perf_counter() - start
    message = str(err.value)
    assert "\n" not in message and expect in message and bad_file in message, message
    LOG.add(
        fault=f"checkpoint: {fault}",
        injected=f"a real checkpoint folder, {bad_file} damaged",
        outcome=message.replace(str(tmp_path), "…"),
        final_state="refused when opened (headers only, no weight read)",
        time_to_error_s=seconds,
        lost="nothing",
        kept=True,
    )


def test_damaged_user_checkpoint_stops_the_pipeline_before_weights_load(
    tiny_ready, tmp_path
) -> None:
    folder = _small_llama(tmp_path / "user_model")
    _truncated(folder)
    cfg = compose_config(*ESTIMATE, f"+model.path={folder}")
    start = time.perf_counter()
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FAILED" and report.failed_stage == "memory_budget"
    assert "model.safetensors is truncated" in report.error and "\n" not in report.error
    run = MlflowClient(default_tracking_uri()).get_run(report.run_id)
    assert run.info.status == "FAILED"
    LOG.add(
        fault="checkpoint: truncated user folder (model.path) in a run",
        injected="model.path= a folder whose model.safetensors lost its last 1000 bytes",
        outcome=report.error.replace(str(tmp_path), "…"),
        final_state="FAILED at memory_budget (the first stage that opens the folder)",
        time_to_error_s=time.perf_counter() - start,
        lost="nothing",
        kept=True,
    )


# (A cached checkpoint or stage result changed, truncated, emptied, deleted or missing keys:
# the cache corruption family in tests/test_fault_families.py, one case each, cheaper.)


# -- config values the checks used to miss -----------------------------------------------

BAD_CONFIGS = [
    ["quant=none", "quant.bits=abc"],
    ["+eval.max_token=100"],
    ["eval.max_token=100"],
    ["+foo=1"],
    ["+quant.bitz=4"],
    ["workload.batch_size=x"],
    ["workload.batch_size=0"],
    ["hardware.memory_gb=big"],
    ["exclude.patterns=3"],
    ["eval.decode_batch_sizes=[1,a]"],
    ["eval.decode=sometimes"],
    ["quant=rtn", "quant.group_size=100"],
    ["quant=rtn", "quant.format=gguf"],
    ["quant=nope"],
    ["device=tpu"],
    ["dtype=fp8"],
    ["kernel=cuda"],
    ["pad_align.mode=stretch"],
    ["model.weights=maybe"],
    ["+model.trust_remote_code=perhaps"],
    ["pipeline=nowhere"],
]


@pytest.mark.parametrize("overrides", BAD_CONFIGS, ids=" ".join)
def test_bad_config_is_refused_before_the_run_opens(overrides, tmp_path) -> None:
    base = ["model=tiny_llama", "pipeline=estimate", "mlflow.experiment=bad_config"]
    code, text = cli_in_process(*base, *overrides, f"hydra.run.dir={tmp_path}")
    lines = [line for line in text.splitlines() if line.strip()]
    if "Traceback" in text:
        verdict = "traceback"
    elif code == 0:
        verdict = "not refused"
    elif len(error_lines(text)) == 1 and len(lines) == 1:
        verdict = "one-line error"
    else:
        verdict = "multi-line, no traceback"
    message = (error_lines(text) or lines or [""])[0].strip()
    LOG.bad_configs.append(
        {"overrides": overrides, "exit": code, "verdict": verdict, "message": message[:300]}
    )
    assert verdict in ("one-line error", "multi-line, no traceback"), text[-3000:]
    assert not (tmp_path / "run.json").exists(), "the run was opened"


# -- safe by default ---------------------------------------------------------------------

_EVIL = """
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

Path(MARKER).write_text("the checkpoint's code ran")


class EvilConfig(LlamaConfig):
    model_type = "llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def test_checkpoint_code_and_pickles_do_not_run_unless_allowed(tiny_ready, tmp_path) -> None:
    folder = _small_llama(tmp_path / "custom_code")
    marker = folder / "CODE_RAN"
    (folder / "configuration_evil.py").write_text(f"MARKER = {str(marker)!r}\n" + _EVIL)
    _edit_config(
        folder,
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "configuration_evil.EvilForCausalLM",
        },
    )
    cfg = compose_config(*ESTIMATE, f"+model.path={folder}")
    report = run_pipeline(cfg, tmp_path / "run_code")
    assert report.status == "FAILED" and "model.trust_remote_code=true" in report.error
    assert not marker.exists()
    code_line = report.error

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    source = _small_llama(tmp_path / "source")
    shutil.copy(source / "config.json", pickled)
    from safetensors.torch import load_file

    torch.save(load_file(source / "model.safetensors"), pickled / "pytorch_model.bin")
    base = [*ESTIMATE, f"+model.path={pickled}"]
    refused = run_pipeline(compose_config(*base), tmp_path / "run_pickle")
    assert refused.status == "FAILED" and "model.allow_pickle=true" in refused.error
    allowed = run_pipeline(compose_config(*base, "+model.allow_pickle=true"), tmp_path / "ok")
    assert allowed.status == "FINISHED", allowed.error

    set_policy(LoadPolicy(trust_remote_code=True))  # what model.trust_remote_code=true sets
    try:
        inspect_checkpoint(folder)
    finally:
        set_policy(LoadPolicy())
    assert marker.exists()  # allowed, the folder's code did run
    with pytest.raises(UnsafeCheckpoint):
        inspect_checkpoint(folder)
    for fault, line in (
        ("a checkpoint with its own code (auto_map)", code_line),
        ("pickle-only weights (pytorch_model.bin)", refused.error),
    ):
        LOG.add(
            fault=f"safe by default: {fault}",
            injected="model.path= a real folder of that kind",
            outcome=line.replace(str(tmp_path), "…"),
            final_state="FAILED at memory_budget, nothing executed; allowed only with "
            + ("model.trust_remote_code=true" if "code" in fault else "model.allow_pickle=true"),
            time_to_error_s=None,
            lost="nothing",
            kept=True,
        )


# -- bad inputs of every kind: files, paths, URIs, numbers, user code, concurrency ---------

_YAML_LIST, _NOT_JSON, _NO_TEXT = "- a\n- b\n", '{"text": 1', '{"body": "x"}\n'
_BINARY = bytes(range(128, 256)) * 8  # no UTF-8 decoder takes 0x80 as a first byte


def _llama_folder(tmp: Path, name: str = "user_model") -> Path:
    return _small_llama(tmp / name)


def _binary_file(tmp: Path, name: str = "binary.txt") -> Path:
    path = tmp / name
    path.write_bytes(_BINARY)
    return path


def _text_file(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _user_stage(tmp: Path, package: str, body: str) -> list[str]:
    """A pipeline whose stage is the user's module ``<package>.stage`` (in the working
    directory, ``tmp``)."""
    (tmp / package).mkdir()
    (tmp / package / "__init__.py").write_text("")
    (tmp / package / "stage.py").write_text(body)
    dag = tmp / "user.yaml"
    dag.write_text(
        f"name: user\nstages:\n  env_check: {{}}\n  mine: {{uses: {package}.stage, "
        "needs: [env_check]}\n"
    )
    return [f"pipeline={dag}"]


def _config_json(tmp: Path, **changes: object) -> Path:
    folder = _llama_folder(tmp)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _locked_entry_is_a_folder(tmp: Path) -> list[str]:
    """A cached stage whose lock file (``<key>.lock`` beside the entry) is a folder."""
    from qpipe.runner import Runner

    dag = tmp / "cached.yaml"
    dag.write_text(
        "name: cached\nstages:\n  env_check: {}\n  memory_budget: {needs: [env_check]}\n"
        "  baseline: {needs: [memory_budget], cache: [model, eval, dtype, device, seed]}\n"
    )
    overrides = ["model=tiny_llama", "eval=quick", "eval.max_tokens=33", f"pipeline={dag}"]
    cfg = compose_config(*overrides)
    spec = load_dag(str(dag)).stages["baseline"]
    key = Runner(cfg, load_dag(str(dag)), tmp, None)._cache_key(spec)
    lock = Path(os.environ["QPIPE_OUTPUTS"]) / "cache" / "stages" / "baseline" / f"{key}.lock"
    lock.mkdir(parents=True, exist_ok=True)
    return overrides[1:]


# (name, kind, how to make it: tmp -> overrides, what the one line must contain)
BAD_INPUTS = [
    # files
    ("eval.text is a binary file", "file",
     lambda t: [f"eval.text={_binary_file(t)}"], "is not UTF-8 text"),
    ("eval.text is a folder", "file", lambda t: [f"eval.text={t}"], "nor a file"),
    ("an extra eval text is a binary file", "file",
     lambda t: [f"eval.extra_texts.pydocs={_binary_file(t)}"], "eval.extra_texts.pydocs"),
    ("the pipeline file is binary", "file",
     lambda t: [f"pipeline={_binary_file(t, 'dag.yaml')}"], "is not UTF-8 text"),
    ("the pipeline file is a YAML list", "file",
     lambda t: [f"pipeline={_text_file(t, 'dag.yaml', _YAML_LIST)}"], "dag.yaml"),
    ("the pipeline file is empty", "file",
     lambda t: [f"pipeline={_text_file(t, 'dag.yaml', '')}"], "dag.yaml"),
    ("the pipeline file is not YAML", "file",
     lambda t: [f"pipeline={_text_file(t, 'dag.yaml', 'stages: [a: {')}"], "not valid YAML"),
    ("calib.dataset is a binary file", "file",
     lambda t: ["quant=gptq", f"calib.dataset={_binary_file(t, 'calib.bin')}"], "calib.bin"),
    ("calib.dataset: a JSONL line is not JSON", "file",
     lambda t: ["quant=gptq", f"calib.dataset={_text_file(t, 'c.jsonl', _NOT_JSON)}"],
     "c.jsonl:1 is not valid JSON"),
    ("calib.dataset: a JSONL without the text field", "file",
     lambda t: ["quant=gptq", f"calib.dataset={_text_file(t, 'c.jsonl', _NO_TEXT)}"],
     "no text field"),
    ("calib.dataset: a folder holding a binary .txt", "file",
     lambda t: ["quant=awq", f"calib.dataset={_binary_file(t, 'x.txt').parent}"], "x.txt"),
    ("calib.dataset is an empty text file", "file",
     lambda t: ["quant=gptq", f"calib.dataset={_text_file(t, 'empty.txt', '  ')}"],
     "holds no text"),
    ("model.path: config.json is binary", "file",
     lambda t: [f"model.path={_binary_file(_llama_folder(t), 'config.json').parent}"],
     "config.json is not valid JSON"),
    ("model.path: config.json has a model_type transformers does not know", "file",
     lambda t: [f"model.path={_config_json(t, model_type='lama2')}"], "'lama2' is not an"),
    ("model.path: config.json has no model_type", "file",
     lambda t: [f"model.path={_config_json(t, model_type=None)}"], "has no model_type"),
    ("model.path: the shard index is binary", "file",
     lambda t: [f"model.path={_binary_file(_llama_folder(t), INDEX).parent}"],
     "is not a valid shard index"),
    # paths
    ("model.path is a file", "path",
     lambda t: [f"model.path={_binary_file(t)}"], "is not a folder"),
    ("model.path is a folder without config.json", "path",
     lambda t: [f"model.path={t}"], "no config.json"),
    ("model.path does not exist", "path",
     lambda t: [f"model.path={t / 'nowhere'}"], "is not a folder"),
    ("model.tokenizer names nothing", "path",
     lambda t: [f"model.tokenizer={t / 'no_tokenizer'}"], "model.tokenizer="),
    ("QPIPE_OUTPUTS is a file", "path",
     lambda t: [f"+_outputs={_binary_file(t)}"], "is a file, not a folder"),
    ("QPIPE_OUTPUTS lies under a file", "path",
     lambda t: [f"+_outputs={_binary_file(t) / 'outputs'}"], "is a file, not a folder"),
    # URIs
    ("mlflow.tracking_uri MLflow refuses (file store)", "uri",
     lambda t: ["mlflow.tracking_uri=file:///proc/nope"], "MLflow refuses"),
    ("mlflow.tracking_uri of an unknown scheme", "uri",
     lambda t: ["mlflow.tracking_uri=foo://bar"], "no tracking store for foo://"),
    ("mlflow.tracking_uri: sqlite under a file", "uri",
     lambda t: [f"mlflow.tracking_uri=sqlite:///{_binary_file(t)}/mlflow.db"], "mlflow.db"),
    ("mlflow.tracking_uri: nothing listens there", "uri",
     lambda t: [f"mlflow.tracking_uri=http://127.0.0.1:{_free_port()}"], "is unreachable"),
    ("mlflow.fallback unknown", "uri", lambda t: ["mlflow.fallback=maybe"], "mlflow.fallback"),
    ("mlflow.experiment empty", "uri", lambda t: ["mlflow.experiment="], "mlflow.experiment"),
    # numbers
    ("negative runtime overhead", "number",
     lambda t: ["hardware.runtime_overhead_gb=-100"], "hardware.runtime_overhead_gb=-100"),
    ("headroom over 100 %", "number", lambda t: ["hardware.headroom_pct=150"], "[0, 100)"),
    ("negative headroom", "number", lambda t: ["hardware.headroom_pct=-5"], "[0, 100)"),
    ("a card of 0 GB in the list", "number",
     lambda t: ["hardware.count=2", "hardware.memory_gb=[8.59,0]"], "hardware.memory_gb"),
    ("three cards listed for two", "number",
     lambda t: ["hardware.count=2", "hardware.memory_gb=[8,8,8]"], "lists 3 cards"),
    ("negative offload", "number", lambda t: ["hardware.offload_gb=-1"], "hardware.offload_gb"),
    ("negative cap per GPU", "number",
     lambda t: ["placement.max_memory_gb=-3"], "placement.max_memory_gb"),
    ("negative seed", "number", lambda t: ["seed=-1"], "seed=-1"),
    ("bnb int8 threshold below 0", "number",
     lambda t: ["quant=bnb_int8", "quant.threshold=-1"], "quant.threshold"),
    ("GPTQ dampening above 1", "number",
     lambda t: ["quant=gptq", "quant.dampening=2"], "quant.dampening"),
    ("AWQ grid of 1 point", "number", lambda t: ["quant=awq", "quant.n_grid=1"], "quant.n_grid"),
    ("no calibration samples", "number",
     lambda t: ["quant=gptq", "calib.num_samples=0"], "calib.num_samples"),
    ("negative keep_top_k", "number",
     lambda t: ["exclude.by=sensitivity", "exclude.keep_top_k=-1"], "exclude.keep_top_k"),
    ("eval.top_k of 0", "number", lambda t: ["eval.top_k=0"], "eval.top_k"),
    ("negative context", "number", lambda t: ["workload.context_len=-5"], "context_len"),
    ("an unknown random dtype", "number",
     lambda t: ["model.random_dtype=int8"], "model.random_dtype"),
    ("a negative weights cap for quant=auto", "number",
     lambda t: ["quant=auto", "quant.weights_gb=-1"], "quant.weights_gb"),
    # user code
    ("user stage with a syntax error", "user code",
     lambda t: _user_stage(t, "pkg_syntax", "def run(ctx)\n    pass\n"), "SyntaxError"),
    ("user stage raising at import", "user code",
     lambda t: _user_stage(t, "pkg_raise", "raise RuntimeError('no GPU here')\n"),
     "RuntimeError: no GPU here"),
    ("user stage calling sys.exit at import", "user code",
     lambda t: _user_stage(t, "pkg_exit", "import sys\nsys.exit(3)\n"), "SystemExit"),
    ("user stage importing what is not installed", "user code",
     lambda t: _user_stage(t, "pkg_missing", "import not_installed_anywhere\n"),
     "not_installed_anywhere"),
    ("user stage without run()", "user code",
     lambda t: _user_stage(t, "pkg_norun", "x = 1\n"), "has no run(ctx)"),
    ("user stage whose run() raises", "user code",
     lambda t: _user_stage(t, "pkg_fails", "def run(ctx):\n    raise ValueError('bad')\n"),
     "ValueError: bad"),
    # concurrency
    ("a cache entry's lock file is a folder", "concurrency",
     _locked_entry_is_a_folder, "cannot lock the cache entry"),
    ("the MLflow store's lock file is a folder", "concurrency",
     lambda t: [f"mlflow.tracking_uri=sqlite:///{(t / 'store.db.lock').mkdir() or t}/store.db"],
     "cannot lock the MLflow store"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kind", "make", "expect"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_line(name, kind, make, expect, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # user stages are found in the working directory
    overrides = make(tmp_path)
    base = ["model=tiny_llama", "pipeline=estimate", "mlflow.experiment=bad_input"]
    outputs = next((o.split("=", 1)[1] for o in overrides if o.startswith("+_outputs=")), None)
    overrides = [o for o in overrides if not o.startswith("+_outputs=")]
    args = [*base, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.perf_counter()
    if outputs is None:
        code, text = cli_in_process(*args)
    else:  # the outputs folder is the process's environment: its own process
        proc = run_qpipe(None, args, env_for(Path(outputs)))
        code, text = proc.returncode, proc.output
    seconds = time.perf_counter() - start
    assert code not in (0, None), text[-3000:]
    line = _one_line(text)
    assert expect in line, line
    opened = (tmp_path / "run" / "run.json").exists()
    LOG.bad_inputs.append(
        {
            "input": name,
            "kind": kind,
            "overrides": overrides,
            "exit": code,
            "when": "in a stage (the run FAILED)" if opened else "before the run opened",
            "message": line.replace(str(tmp_path), "…").replace(
                os.environ["QPIPE_OUTPUTS"], "outputs"
            )[:300],
            "seconds": round(seconds, 2),
        }
    )
