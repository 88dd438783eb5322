"""The fault families of issue 35, each case made to happen for real and cheaply: a micro
random Llama (1 layer, hidden 64) with a small real tokenizer, runs in this process through
qpipe's entry point (``cli_in_process``), real signals sent to this process, real files
damaged, real sqlite stores made read-only, locked, full or corrupt, real helper processes
holding the locks and folders a live qpipe would hold.

Each case asserts one line naming what is wrong, exit ≠ 0 (or, for a fault qpipe survives, the
right result), no traceback; for a recoverable fault, the right result on the next run. Written
to bench/results/faults.md with tests/test_faults.py (``QPIPE_FAULTS_RESULTS``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qpipe.app import run_pipeline
from qpipe.corpora.texts import read_text
from qpipe.dag import load_dag
from qpipe.models import materialize
from qpipe.runner import Runner
from qpipe.store.entry import MANIFEST, save_folder_atomically, seal
from qpipe.tracking.runs import default_tracking_uri
from tests.conftest import cli_in_process, compose_config
from tests.faults_support import LOG, REPO, RESULTS_ENV, error_lines, mlflow_run

pytestmark = pytest.mark.slow

MICRO_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}
FAST = (
    "quant=rtn",
    "quant.format=qpipe-w4",
    "quant.group_size=32",
    "eval=quick",
    "eval.max_tokens=48",
    "eval.window=48",
    "eval.prefill_tokens=8",
    "eval.max_new_tokens=2",
    "eval.decode=eager",
    "eval.quality_on_random=true",
    "eval.prompts=[a]",
    "eval.extra_texts={}",
    "workload.context_len=32",
    "mlflow.experiment=families",
)
CACHED = {  # the cached stage and what it needs, no more
    "baseline": "name: cached_baseline\nstages:\n"
    "  baseline: {cache: [model, eval, dtype, device, seed]}\n",
    "quantize": "name: cached_quantize\nstages:\n  env_check: {}\n"
    "  memory_budget: {needs: [env_check]}\n  exclude_layers: {needs: [memory_budget]}\n"
    "  pad_align: {needs: [exclude_layers]}\n"
    "  quantize: {needs: [memory_budget, pad_align], cache: [model, quant, exclude, seed]}\n",
}


@pytest.fixture(scope="module", autouse=True)
def fault_log():
    yield LOG
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        LOG.write(Path(folder))


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory, outputs_dir: Path) -> list[str]:
    """The overrides of the micro model: tiny_llama made smaller, borrowing a small real
    word-level tokenizer (a folder) built from qpipe's own eval texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    words = re.findall(r"\w+|[^\w\s]", read_text("eval_gpl3.txt") + read_text("eval_pydocs.txt"))
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(folder)
    arch = [f"model.config.{k}={v}" for k, v in MICRO_ARCH.items()]
    return [
        "model=tiny_llama",
        f"model.tokenizer={folder}",
        f"model.config.vocab_size={len(vocab)}",
        *arch,
        *FAST,
    ]


@pytest.fixture(scope="module")
def env_only(tmp_path_factory) -> str:
    """A pipeline of env_check alone: sweeps whose jobs cost next to nothing."""
    path = tmp_path_factory.mktemp("dag") / "env_only.yaml"
    path.write_text("name: env_only\nstages:\n  env_check: {}\n")
    return f"pipeline={path}"


def _dag(tmp: Path, stage: str) -> str:
    path = tmp / f"cached_{stage}.yaml"
    path.write_text(CACHED[stage])
    return str(path)


def _one_line(text: str) -> str:
    lines = error_lines(text)
    assert len(lines) == 1, f"expected one error line, got {lines}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    return lines[0].strip()


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _warning(caplog: pytest.LogCaptureFixture, needle: str) -> str:
    found = [r.getMessage() for r in caplog.records if needle in r.getMessage()]
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    return found[0]


# -- cache corruption: every kind, every damage ------------------------------------------


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _drop_key(path: Path, key: str) -> None:
    data = json.loads(path.read_text())
    data.pop(key)
    path.write_text(json.dumps(data))


DAMAGES = ("bit flip", "truncation", "empty", "missing keys")


def _damage(kind: str, damage: str, file: Path, key: str) -> None:
    if damage == "bit flip":
        _flip(file)
    elif damage == "truncation":
        _truncate(file)
    elif damage == "empty":
        _empty(file)
    else:
        _drop_key(file, key)


@pytest.mark.parametrize("damage", DAMAGES)
def test_cached_model_folder_damaged_is_moved_aside_and_rebuilt(
    damage, micro, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_config(*micro).model
    entry = materialize(cfg)
    weights = entry / "model.safetensors"
    good = _sha(weights), _sha(entry / "config.json")
    target = entry / ("config.json" if damage == "missing keys" else "model.safetensors")
    _damage("model", damage, target, "model_type")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="qpipe"):
        again = materialize(cfg)
    seconds = time.perf_counter() - start
    line = _warning(caplog, "is damaged")
    assert "moved aside" in line and target.name in line, line
    assert again == entry and (_sha(weights), _sha(entry / "config.json")) == good
    aside = [p for p in entry.parent.iterdir() if p.name.startswith(f"{entry.name}.damaged-")]
    assert aside, "the damaged folder was not kept for inspection"
    LOG.family(
        "cache corruption",
        f"model folder: {damage} ({target.name})",
        line,
        None,
        "moved aside (kept), the folder written again",
        recovered=True,
        seconds=seconds,
    )


@pytest.mark.parametrize("damage", DAMAGES)
def test_cached_tokenizer_damaged_is_moved_aside_and_rewritten(
    damage, micro, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    source = Path(next(o.split("=", 1)[1] for o in micro if o.startswith("model.tokenizer=")))
    original = AutoTokenizer.from_pretrained(source)
    target = tmp_path / "cache" / "tokenizers" / "micro-words"

    def use() -> list[int]:  # what qpipe's GGUF and Qwen tokenizer caches do
        folder = save_folder_atomically(
            target,
            lambda out: original.save_pretrained(out),
            needed=2**20,
            marker="tokenizer_config.json",
            what="the tokenizer",
            kind="tokenizer",
        )
        return AutoTokenizer.from_pretrained(folder)("the program is free software").input_ids

    ids = use()
    file = target / ("tokenizer_config.json" if damage == "missing keys" else "tokenizer.json")
    _damage("tokenizer", damage, file, "tokenizer_class")
    with caplog.at_level(logging.WARNING, logger="qpipe"):
        assert use() == ids
    line = _warning(caplog, "is damaged")
    assert "cached tokenizer" in line and file.name in line, line
    LOG.family(
        "cache corruption",
        f"tokenizer: {damage} ({file.name})",
        line.replace(str(tmp_path), "…"),
        None,
        "moved aside (kept), the tokenizer written again",
        recovered=True,
    )


class StageCache:
    """One cached stage of the micro model, computed once for the module: the config, its
    DAG, the entry and what a right result holds."""

    def __init__(self, micro: list[str], tmp: Path, stage: str) -> None:
        from qpipe.preflight import validate_config

        self.tmp, self.stage = tmp, stage
        self.dag = _dag(tmp, stage)
        self.cfg = compose_config(*micro, f"pipeline={self.dag}", "seed=3")
        self.settings = validate_config(self.cfg)
        self.first = self.run("first")
        assert self.first.status == "FINISHED", self.first.error
        self.entry = (
            Path(os.environ["QPIPE_OUTPUTS"])
            / "cache"
            / "stages"
            / stage
            / (
                Runner(self.cfg, load_dag(self.dag), tmp, None)._cache_key(
                    load_dag(self.dag).stages[stage]
                )
            )
        )
        assert self.entry.is_dir()

    def run(self, name: str):
        return Runner(self.cfg, load_dag(self.dag), self.tmp / name, None, self.settings).run()


@pytest.fixture(scope="module")
def baseline_cache(micro, tmp_path_factory) -> StageCache:
    return StageCache(micro, tmp_path_factory.mktemp("baseline"), "baseline")


@pytest.fixture(scope="module")
def quantize_cache(micro, tmp_path_factory) -> StageCache:
    return StageCache(micro, tmp_path_factory.mktemp("quantize"), "quantize")


@pytest.mark.parametrize("damage", [*DAMAGES, "NaN metric"])
def test_cached_baseline_result_damaged_is_moved_aside_and_recomputed(
    damage, baseline_cache: StageCache, caplog: pytest.LogCaptureFixture
) -> None:
    cache = baseline_cache
    entry, ppl = cache.entry, cache.first.results["baseline"].outputs["ppl"]
    record = entry / "result.json"
    if damage in ("missing keys", "NaN metric"):
        # Written so by a writer (an older qpipe, a bug): the manifest agrees, the record not.
        data = json.loads(record.read_text())
        if damage == "missing keys":
            data.pop("outputs")
        else:
            data["metrics"]["quality.baseline_ppl"] = float("nan")
        record.write_text(json.dumps(data))
        (entry / MANIFEST).unlink()
        seal(entry, "baseline result")
        expect = "lacks outputs" if damage == "missing keys" else "NaN/inf result is never reused"
    else:
        files = sorted(p for p in entry.iterdir() if p.suffix == ".pt")
        target = record if damage == "empty" or not files else files[0]
        _damage("result", damage, target, "")
        expect = target.name
    with caplog.at_level(logging.WARNING, logger="qpipe"):
        again = cache.run(f"again-{damage}")
    assert again.status == "FINISHED", again.error
    line = _warning(caplog, "is damaged")
    assert expect in line, line
    assert again.params["cache.baseline"] == "miss"
    assert again.results["baseline"].outputs["ppl"] == pytest.approx(ppl)
    LOG.family(
        "cache corruption",
        f"stage result (baseline): {damage}",
        line,
        None,
        "moved aside (kept), recomputed: the same perplexity",
        recovered=True,
    )


@pytest.mark.parametrize("damage", [*DAMAGES, "file deleted"])
def test_cached_checkpoint_damaged_is_moved_aside_and_requantized(
    damage, quantize_cache: StageCache, caplog: pytest.LogCaptureFixture
) -> None:
    cache = quantize_cache
    checkpoint = Path(cache.first.results["quantize"].outputs["checkpoint"])
    weights = checkpoint / "model.safetensors"
    good = _sha(weights)
    target = checkpoint / "config.json" if damage in ("missing keys", "file deleted") else weights
    if damage == "file deleted":
        target.unlink()
    else:
        _damage("checkpoint", damage, target, "quantization_config")
    with caplog.at_level(logging.WARNING, logger="qpipe"):
        again = cache.run(f"again-{damage}")
    assert again.status == "FINISHED", again.error
    line = _warning(caplog, "is damaged")
    assert target.name in line, line
    assert again.params["cache.quantize"] == "miss"
    assert _sha(Path(again.results["quantize"].outputs["checkpoint"]) / "model.safetensors") == good
    LOG.family(
        "cache corruption",
        f"checkpoint (quantize): {damage} ({target.name})",
        line,
        None,
        "moved aside (kept), quantized again: the same bytes",
        recovered=True,
    )


def test_a_nan_result_fails_the_run_is_never_cached_and_the_next_run_is_right(
    micro, baseline_cache: StageCache, tmp_path
) -> None:
    from safetensors.torch import load_file, save_file

    good = materialize(baseline_cache.cfg.model)
    folder = tmp_path / "user_model"  # the user's own folder: not a cache entry
    folder.mkdir()
    for p in good.iterdir():
        if not p.name.startswith("."):
            (folder / p.name).write_bytes(p.read_bytes())
    tensors = load_file(good / "model.safetensors")
    broken = dict(tensors)
    broken["model.norm.weight"] = broken["model.norm.weight"].clone()
    broken["model.norm.weight"][0] = float("nan")
    save_file(broken, folder / "model.safetensors", metadata={"format": "pt"})
    cache = StageCache.__new__(StageCache)
    cache.tmp, cache.stage, cache.dag = tmp_path, "baseline", baseline_cache.dag
    cache.cfg = compose_config(*micro, f"model.path={folder}", f"pipeline={cache.dag}")
    from qpipe.preflight import validate_config

    cache.settings = validate_config(cache.cfg)
    nan = cache.run("nan")
    assert nan.status == "FAILED" and nan.failed_stage == "baseline", nan.error
    assert "quality.baseline_ppl=nan" in nan.error and "nothing was cached" in nan.error
    assert "\n" not in nan.error
    stages = Path(os.environ["QPIPE_OUTPUTS"]) / "cache" / "stages" / "baseline"
    before = {p.name for p in stages.iterdir()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    fixed = cache.run("fixed")
    assert fixed.status == "FINISHED", fixed.error
    assert fixed.params["cache.baseline"] == "miss"  # the NaN was never stored
    ppl = fixed.metrics["quality.baseline_ppl"]
    assert ppl == pytest.approx(baseline_cache.first.metrics["quality.baseline_ppl"])
    assert {p.name for p in stages.iterdir()} - before
    LOG.family(
        "cache corruption",
        "a NaN result (a user folder whose weights hold a NaN)",
        f"✘ baseline: {nan.error}".replace(str(tmp_path), "…"),
        1,
        "FAILED at baseline, nothing cached; the fixed folder: computed anew, the right value",
        recovered=True,
    )


# -- the MLflow store: read-only, locked, full, corrupt ----------------------------------

_FILL_STAGE = """import resource
from qpipe.stages.base import StageResult

def run(ctx):  # the disk fills up: no file may grow past 64 kB from here on
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    return StageResult(outputs={})
"""


@pytest.fixture(scope="module")
def good_store(micro, tmp_path_factory) -> Path:
    """A healthy store holding runs: the session's own (made by the first test that logs, or
    here), copied for each case to damage."""
    db = Path(default_tracking_uri().removeprefix("sqlite:///"))
    if not db.is_file():
        folder = tmp_path_factory.mktemp("store")
        code, text = cli_in_process(*micro, "pipeline=estimate", f"hydra.run.dir={folder}")
        assert code == 0, text[-3000:]
    copy = tmp_path_factory.mktemp("good_store") / "mlflow.db"
    copy.write_bytes(db.read_bytes())
    return copy


def _store_copy(good: Path, tmp: Path) -> Path:
    db = tmp / "mlflow.db"
    db.write_bytes(good.read_bytes())
    return db


def _read_only(db: Path) -> Callable[[], None]:
    """Make ``db`` read-only for this process (root ignores permissions: the immutable flag);
    the function that undoes it."""
    if os.geteuid() != 0:
        db.chmod(0o444)
        return lambda: db.chmod(0o644)
    done = subprocess.run(["chattr", "+i", str(db)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("root without chattr: a read-only file cannot be made here")
    return lambda: subprocess.run(["chattr", "-i", str(db)], check=True)


@contextlib.contextmanager
def _file_size_limit(limit: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _store_case(micro, db: Path, tmp: Path, name: str) -> tuple[int, str]:
    return cli_in_process(
        *micro,
        "pipeline=estimate",
        f"mlflow.tracking_uri=sqlite:///{db}",
        f"hydra.run.dir={tmp / name}",
    )


@pytest.mark.parametrize("fault", ["read-only", "locked", "full", "corrupt"])
def test_a_store_that_cannot_take_the_run_is_one_line_before_it_opens(
    fault, micro, good_store, tmp_path, monkeypatch
) -> None:
    db = _store_copy(good_store, tmp_path)
    undo: Callable[[], None] = lambda: None  # noqa: E731
    holder = None
    if fault == "read-only":
        undo = _read_only(db)
        expect = "is read-only"
    elif fault == "locked":
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys, time\n"
             "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(120)", str(db)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("QPIPE_STORE_BUSY_S", "0.5")
        expect = f"is locked by pid {holder.pid}"
    elif fault == "corrupt":
        with open(db, "r+b") as f:
            f.write(b"not sqlite" * 20)
        expect = "is damaged"
    else:
        expect = "cannot grow"
    try:
        start = time.perf_counter()
        if fault == "full":
            with _file_size_limit(db.stat().st_size):
                code, text = _store_case(micro, db, tmp_path, "refused")
        else:
            code, text = _store_case(micro, db, tmp_path, "refused")
        seconds = time.perf_counter() - start
    finally:
        undo()
        if holder is not None:
            holder.kill()
            holder.wait()
    assert code == 2, text[-3000:]
    line = _one_line(text)
    assert expect in line and str(db) in line, line
    assert not (tmp_path / "refused" / "run.json").exists(), "the run was opened"
    if fault == "corrupt":  # what the line says: moved aside; then a copy from a backup
        db.rename(db.with_name("mlflow.db.broken"))
        _store_copy(good_store, tmp_path)
    code, text = _store_case(micro, db, tmp_path, "next")
    assert code == 0, text[-3000:]
    LOG.family(
        "store faults",
        f"sqlite store {fault}" + (" (RLIMIT_FSIZE at its size)" if fault == "full" else ""),
        line.replace(str(tmp_path), "…"),
        2,
        "refused before the run opened",
        recovered=True,
        seconds=seconds,
    )


def test_a_store_that_fills_mid_run_keeps_the_results_in_the_journal(
    micro, good_store, tmp_path, monkeypatch
) -> None:
    db = _store_copy(good_store, tmp_path)
    (tmp_path / "fillpkg").mkdir()
    (tmp_path / "fillpkg" / "__init__.py").write_text("")
    (tmp_path / "fillpkg" / "fill.py").write_text(_FILL_STAGE)
    dag = tmp_path / "fills.yaml"
    dag.write_text(
        "name: fills\nstages:\n  env_check: {}\n  fill: {uses: fillpkg.fill, needs: [env_check]}\n"
        "  memory_budget: {needs: [fill]}\n"
    )
    monkeypatch.chdir(tmp_path)  # the user stage's package
    run_dir = tmp_path / "run"
    with _file_size_limit(resource.RLIM_INFINITY):  # the stage lowers it; restored after
        code, text = cli_in_process(
            *micro,
            f"pipeline={dag}",
            f"mlflow.tracking_uri=sqlite:///{db}",
            f"hydra.run.dir={run_dir}",
        )
    assert code == 0, text[-3000:]
    line = _one_line(text)
    assert "stopped taking writes" in line and f"python -m qpipe.sync {run_dir}" in line, line
    journal = json.loads((run_dir / "run.json").read_text())
    assert journal["status"] == "FINISHED" and journal["tracking_offline"]["stage"] in (
        "fill",
        "env_check",
    )
    assert "mem.est_weights_gb" in journal["metrics"]  # measured after the store failed
    from qpipe.sync import sync

    sync(run_dir)  # the disk has room again: the journal is pushed
    run = MlflowClient(f"sqlite:///{db}").get_run(journal["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["mem.est_weights_gb"] == pytest.approx(
        journal["metrics"]["mem.est_weights_gb"]
    )
    LOG.family(
        "store faults",
        "sqlite store full mid-run (RLIMIT_FSIZE 64 kB from a stage on)",
        line.replace(str(tmp_path), "…"),
        code,
        "the run FINISHED; run.json kept every result; qpipe.sync pushed them",
        recovered=True,
    )


# -- colliding runs and sweeps ----------------------------------------------------------

_HOLD_CLAIM = """import pathlib, sys, time
from qpipe.store.claims import take
take(pathlib.Path(sys.argv[1]), sys.argv[2], "{holder}")
print("held", flush=True)
time.sleep(120)
"""

_HOLD_ENTRY = """import pathlib, sys, time
from qpipe.store.entry import entry_lock
with entry_lock(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""

_LIVE_SWEEP = """import secrets, sys, time
from omegaconf import OmegaConf
OmegaConf.register_new_resolver("qpipe.run_token", lambda: secrets.token_hex(3), use_cache=True)
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from qpipe import sweep
from qpipe.config.compose import CONF_DIR, normalize_overrides
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = GlobalHydra.instance().hydra.compose_config(
        "config", normalize_overrides(sys.argv[1:]), run_mode=RunMode.MULTIRUN
    )
print(sweep.Sweep.open(cfg).parent_id, flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def _helper(script: str, *args: str):
    """A real process running ``script`` (a qpipe process's lock, claim or live sweep), up
    once it printed its first line; the line and the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline().strip()
        assert line, "the helper process did not start"
        yield line, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def test_a_run_folder_live_in_another_process_is_refused_before_hydra_writes_in_it(
    micro, tmp_path
) -> None:
    from qpipe.store.claims import RUN_CLAIM

    folder = tmp_path / "shared_run"
    args = [*micro, "pipeline=estimate", f"hydra.run.dir={folder}"]
    with _helper(_HOLD_CLAIM, str(folder), RUN_CLAIM) as (_, holder):
        code, text = cli_in_process(*args)
        direct = None
        try:
            run_pipeline(compose_config(*micro, "pipeline=estimate"), folder)
        except Exception as err:  # noqa: BLE001 (the refusal, checked below)
            direct = str(err)
    assert code == 2, text[-3000:]
    line = _one_line(text)
    assert f"pid {holder.pid}" in line and "in use by another qpipe run" in line, line
    assert not (folder / ".hydra").exists() and not (folder / "run.json").exists()
    assert direct is not None and f"pid {holder.pid}" in direct  # without Hydra too
    code, text = cli_in_process(*args)  # the holder ended: the folder is free
    assert code == 0, text[-3000:]
    LOG.family(
        "colliding runs and sweeps",
        "the same hydra.run.dir while another run writes there",
        line.replace(str(tmp_path), "…"),
        2,
        "refused before Hydra wrote its .hydra files; free once the holder ended",
        recovered=True,
    )


def test_runs_started_in_the_same_second_get_folders_of_their_own(micro) -> None:
    from hydra import compose, initialize_config_dir

    import qpipe.__main__  # noqa: F401 (the resolvers the default folders use)
    from qpipe.config.compose import CONF_DIR, normalize_overrides

    folders = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for _ in range(3):
            cfg = compose("config", normalize_overrides(list(micro)), return_hydra_config=True)
            folders.append(str(cfg.hydra.run.dir))
    assert len(set(folders)) == 3, folders
    LOG.family(
        "colliding runs and sweeps",
        "three runs composed in the same second, default folders",
        "(no line: each gets its own folder) " + ", ".join(Path(f).name for f in folders),
        0,
        "three folders",
    )


def _parents(experiment: str) -> list:
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`qpipe.role` = 'parent'")


def test_the_same_sweep_started_twice_is_refused_while_the_first_lives(
    micro, env_only, tmp_path
) -> None:
    sweep = [*micro, env_only, "mlflow.experiment=collide", "seed=1,2"]
    with _helper(_LIVE_SWEEP, *sweep) as (parent, holder):
        code, text = cli_in_process("--multirun", *sweep)
        assert code == 2, text[-3000:]
        line = _one_line(text)
    assert f"pid {holder.pid}" in line and parent in line, line
    runs = MlflowClient(default_tracking_uri()).search_runs(
        [_parents("collide")[0].info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert runs == [], "the refused command ran jobs"
    code, text = cli_in_process("--multirun", *sweep)  # the first one is gone: resumed
    assert code == 0, text[-3000:]
    (resumed,) = [p for p in _parents("collide") if p.info.run_id == parent]
    assert resumed.info.status == "FINISHED" and resumed.data.metrics["sweep.jobs_finished"] == 2
    LOG.family(
        "colliding runs and sweeps",
        "the same sweep command while it runs in another process",
        line,
        2,
        "refused, nothing of the live sweep touched; after it ended, the command resumed it",
        recovered=True,
    )
    # Its folder now holds that sweep's jobs: another sweep given the same folder is refused.
    folder = resumed.data.tags.get("qpipe.sweep_dir") or ""
    other = [*micro, env_only, "mlflow.experiment=collide", "seed=3,4"]
    code, text = cli_in_process("--multirun", *other, f"hydra.sweep.dir={folder}")
    assert code == 2, text[-3000:]
    line = _one_line(text)
    assert "holds the jobs of another sweep" in line, line
    LOG.family(
        "colliding runs and sweeps",
        "another sweep given a finished sweep's hydra.sweep.dir",
        line.replace(folder, "multirun/…"),
        2,
        "refused before its parent run opened",
    )


def test_a_sweep_folder_live_in_another_process_is_refused(micro, env_only, tmp_path) -> None:
    from qpipe.store.claims import SWEEP_CLAIM

    folder = tmp_path / "shared_sweep"
    sweep = [*micro, env_only, "mlflow.experiment=collide2", "seed=1,2"]
    with _helper(_HOLD_CLAIM, str(folder), SWEEP_CLAIM) as (_, holder):
        code, text = cli_in_process("--multirun", *sweep, f"hydra.sweep.dir={folder}")
    assert code == 2, text[-3000:]
    line = _one_line(text)
    assert f"pid {holder.pid}" in line and "in use by another sweep" in line, line
    assert _parents("collide2") == [] and not list(folder.glob("*/run.json"))
    LOG.family(
        "colliding runs and sweeps",
        "two different sweeps given the same hydra.sweep.dir at once",
        line.replace(str(tmp_path), "…"),
        2,
        "the second refused before its parent run opened",
    )


# -- signals at every stage -------------------------------------------------------------

DEFAULT_STAGES = (
    "env_check",
    "sensitivity",
    "memory_budget",
    "exclude_layers",
    "pad_align",
    "baseline",
    "quantize",
    "load",
    "validate_vram",
    "benchmark",
)
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)  # SIGHUP meets quantize (issue 35)
# Every stage of the default pipeline meets a signal, and every signal several stages (one of
# them a cached stage, whose partial folder must go): ten runs, not thirty (each one costs the
# stages before it), the same handler for all three.
SIGNAL_CASES = [(stage, SIGNALS[i % 3]) for i, stage in enumerate(DEFAULT_STAGES)]


def _arm(monkeypatch, stage: str, action: Callable[[], None], call: int = 1) -> None:
    """Make ``action`` happen inside the real stage ``stage`` at its ``call``-th run."""
    import importlib

    module = importlib.import_module(f"qpipe.stages.{stage}")
    original, calls = module.run, {"n": 0}

    def run(ctx):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return original(ctx)

    monkeypatch.setattr(module, "run", run)


def _send(sig: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), sig)


def _partials() -> list[Path]:
    return sorted((Path(os.environ["QPIPE_OUTPUTS"]) / "cache").rglob("*.partial"))


@pytest.mark.parametrize(
    ("stage", "sig"), SIGNAL_CASES, ids=[f"{s}-{g.name}" for s, g in SIGNAL_CASES]
)
def test_a_signal_in_any_stage_ends_the_run_killed(
    stage, sig, micro, tmp_path, monkeypatch
) -> None:
    dag = load_dag("default")
    if dag.stages[stage].cache:  # an earlier case cached it: the stage must really run here
        import shutil

        cfg = compose_config(*micro, "seed=21")
        key = Runner(cfg, dag, tmp_path, None)._cache_key(dag.stages[stage])
        stages = Path(os.environ["QPIPE_OUTPUTS"]) / "cache" / "stages" / stage
        shutil.rmtree(stages / key, ignore_errors=True)
    _arm(monkeypatch, stage, _send(sig))
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    code, text = cli_in_process(*micro, "seed=21", f"hydra.run.dir={run_dir}")
    seconds = time.perf_counter() - start
    assert code == 128 + sig, text[-3000:]
    line = _one_line(text)
    assert f"interrupted ({sig.name})" in line, line
    run = mlflow_run(default_tracking_uri(), run_dir)
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["qpipe.failed_stage"] == stage
    assert run.data.tags["qpipe.failure"] == f"interrupted by {sig.name}"
    assert not _partials(), _partials()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "KILLED"
    LOG.family(
        "signals at every stage",
        f"{sig.name} in {stage}",
        line,
        code,
        f"KILLED at {stage}, partial output removed",
        seconds=seconds,
    )


class _SignalInFinalizer:
    """An object whose finalizer meets the signal: Python drops an exception raised there."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_whose_exception_is_lost_still_ends_the_run_killed(
    micro, tmp_path, monkeypatch
) -> None:
    _arm(monkeypatch, "quantize", lambda: _SignalInFinalizer())  # dropped at once
    run_dir = tmp_path / "run"
    code, text = cli_in_process(*micro, "seed=22", f"hydra.run.dir={run_dir}")
    assert code == 143, text[-3000:]
    line = _one_line(text)
    assert "Exception ignored" not in text
    run = mlflow_run(default_tracking_uri(), run_dir)
    assert run.info.status == "KILLED" and run.data.tags["qpipe.failed_stage"] == "quantize"
    assert not _partials()
    LOG.family(
        "signals at every stage",
        "SIGTERM whose exception is lost (raised in a finalizer during quantize)",
        line,
        code,
        "KILLED at quantize (not FINISHED), partial output removed",
    )


def test_sigterm_during_a_sweep_closes_its_parent_killed_and_it_resumes(
    micro, env_only, monkeypatch
) -> None:
    sweep = [*micro, env_only, "mlflow.experiment=sweep_signal", "seed=1,2"]
    _arm(monkeypatch, "env_check", _send(signal.SIGTERM))
    code, text = cli_in_process("--multirun", *sweep)
    assert code == 143, text[-3000:]
    line = _one_line(text)
    (parent,) = _parents("sweep_signal")
    assert parent.info.status == "KILLED", parent.info.status
    assert parent.data.tags["qpipe.failure"] == "interrupted by SIGTERM"
    monkeypatch.undo()
    code, text = cli_in_process("--multirun", *sweep)
    assert code == 0, text[-3000:]
    (parent,) = _parents("sweep_signal")
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep.jobs_finished"] == 2
    LOG.family(
        "signals at every stage",
        "SIGTERM during a sweep's job",
        line,
        143,
        "the job and the sweep's parent run KILLED; the same command resumed and FINISHED it",
        recovered=True,
    )


# -- launchers that cannot start, lock waits that must end -------------------------------


@pytest.mark.parametrize(
    ("case", "launcher", "expect"),
    [
        (
            "hydra.launcher.n_jobs=0",
            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=0"],
            "runs no job",
        ),
        ("submitit_slurm without SLURM", ["hydra/launcher=submitit_slurm"], "needs SLURM"),
    ],
)
def test_a_launcher_that_cannot_start_is_refused_before_the_parent_opens(
    case, launcher, expect, micro, env_only
) -> None:
    if "slurm" in case and any(
        (Path(d) / "sbatch").exists() for d in os.environ.get("PATH", "").split(":")
    ):
        pytest.skip("SLURM is here")
    sweep = [*micro, env_only, "mlflow.experiment=launchers", "seed=1,2"]
    code, text = cli_in_process("--multirun", *sweep, *launcher)
    assert code == 2, text[-3000:]
    line = _one_line(text)
    assert expect in line, line
    assert _parents("launchers") == []
    LOG.family("launchers and lock waits", case, line, code, "refused; no parent run opened")


def _baseline_entry(cfg) -> Path:
    dag = load_dag(str(cfg.pipeline))
    key = Runner(cfg, dag, Path("."), None)._cache_key(dag.stages["baseline"])
    return Path(os.environ["QPIPE_OUTPUTS"]) / "cache" / "stages" / "baseline" / key


@pytest.mark.parametrize("holder_state", ["stopped", "past the bound"])
def test_a_lock_wait_names_its_holder_and_gives_up(
    holder_state, micro, tmp_path, monkeypatch
) -> None:
    dag = _dag(tmp_path, "baseline")
    seed = "seed=31" if holder_state == "stopped" else "seed=32"
    args = [*micro, f"pipeline={dag}", seed, f"hydra.run.dir={tmp_path / 'run'}"]
    entry = _baseline_entry(compose_config(*micro, f"pipeline={dag}", seed))
    monkeypatch.setenv("QPIPE_LOCK_WAIT_S", "600" if holder_state == "stopped" else "1")
    with _helper(_HOLD_ENTRY, str(entry)) as (_, holder):
        if holder_state == "stopped":
            holder.send_signal(signal.SIGSTOP)  # what Ctrl-Z does to a run in a terminal
        start = time.perf_counter()
        code, text = cli_in_process(*args)
        seconds = time.perf_counter() - start
    assert code == 1, text[-3000:]
    line = _one_line(text)
    assert f"pid {holder.pid}" in line, line
    assert ("is stopped" if holder_state == "stopped" else "gave up after") in line, line
    assert seconds < 60
    refused = code
    code, text = cli_in_process(*args[:-1], f"hydra.run.dir={tmp_path / 'next'}")
    assert code == 0, text[-3000:]
    code = refused
    LOG.family(
        "launchers and lock waits",
        f"a cache lock whose holder is {holder_state}"
        + (" (SIGSTOP, as Ctrl-Z)" if holder_state == "stopped" else " (QPIPE_LOCK_WAIT_S=1)"),
        line.replace(str(Path(os.environ["QPIPE_OUTPUTS"])), "outputs"),
        code,
        "FAILED at baseline in seconds; the holder gone, the next run FINISHED",
        recovered=True,
        seconds=seconds,
    )


# -- hostile YAML, special files and link loops ------------------------------------------


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _loop(tmp: Path, name: str = "loop") -> Path:
    a, b = tmp / f"{name}_a", tmp / f"{name}_b"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _fifo(tmp: Path, name: str = "fifo.txt") -> Path:
    path = tmp / name
    os.mkfifo(path)
    return path


_TINY_MODEL = (REPO / "qpipe" / "conf" / "model" / "tiny_llama.yaml").read_text()
_DAG = "name: x\nstages:\n  env_check: {}\n  memory_budget: {needs: [env_check]}\n"
_BOMB_DAG = _bomb() + _DAG
_BOMB_MODEL = _TINY_MODEL + "extra:\n" + "".join(f"  {line}\n" for line in _bomb().splitlines())


# (family, case, how to make it: tmp -> overrides, what the line must hold)
HOSTILE = [
    ("hostile YAML", "alias bomb as the pipeline",
     lambda t: [f"pipeline={_write(t / 'p.yaml', _BOMB_DAG)}"],
     "billion laughs"),
    ("hostile YAML", "alias bomb as a model config (./conf/model)",
     lambda t: [_write(t / "conf/model/bomb.yaml", _BOMB_MODEL) and "model=bomb"],
     "billion laughs"),
    ("hostile YAML", "alias bomb as a quant config (--config-dir)",
     lambda t: [_write(t / "cd/quant/bomb.yaml", "method: rtn\n" + _bomb()) and
                f"--config-dir={t / 'cd'}", "quant=bomb"], "billion laughs"),
    ("hostile YAML", "alias bomb in ./conf/quant, not selected (the quant registry reads it)",
     lambda t: [_write(t / "conf/quant/bomb.yaml", "method: rtn\n" + _bomb()) and "seed=0"],
     "billion laughs"),
    ("hostile YAML", "a pipeline nested 5000 levels deep",
     lambda t: [f"pipeline={_write(t / 'deep.yaml', 'stages: ' + '[' * 5000 + ']' * 5000)}"],
     "not valid YAML"),
    ("hostile YAML", "a pipeline nested 100 levels deep",
     lambda t: [f"pipeline={_write(t / 'deep.yaml', 'stages: ' + '[' * 100 + ']' * 100)}"],
     "nests deeper than 64"),
    ("hostile YAML", "a 2 MB pipeline",
     lambda t: [f"pipeline={_write(t / 'big.yaml', _DAG + '#' * 2_000_000)}"],
     "holds more than 1 MiB"),
    ("hostile YAML", "needs: a nested list",
     lambda t: [f"pipeline={_write(t / 'n.yaml', _DAG.replace('[env_check]', '[[env_check]]'))}"],
     "needs must be a list of stage names"),
    ("hostile YAML", "needs: a mapping",
     lambda t: [f"pipeline={_write(t / 'n.yaml', _DAG.replace('[env_check]', '{a: 1}'))}"],
     "needs must be a list of stage names"),
    ("special files and link loops", "model.path is a symbolic link loop",
     lambda t: [f"model.path={_loop(t)}"], "symbolic link loop"),
    ("special files and link loops", "model.path is a device (/dev/null)",
     lambda t: ["model.path=/dev/null"], "(a device)"),
    ("special files and link loops", "eval.text=/dev/zero (endless)",
     lambda t: ["eval.text=/dev/zero"], "(a device)"),
    ("special files and link loops", "eval.text is a named pipe",
     lambda t: [f"eval.text={_fifo(t)}"], "(a named pipe)"),
    ("special files and link loops", "calib.dataset=/dev/zero (endless)",
     lambda t: ["quant=gptq", "calib.dataset=/dev/zero"],
     "is a device"),
    ("special files and link loops", "calib.dataset is a named pipe",
     lambda t: ["quant=gptq", f"calib.dataset={_fifo(t)}"],
     "is a named pipe"),
    ("special files and link loops", "pipeline=/dev/zero",
     lambda t: ["pipeline=/dev/zero"], "a device, not a file"),
    ("special files and link loops", "hydra.run.dir is an existing file",
     lambda t: [f"hydra.run.dir={_write(t / 'a_file', 'x')}"], "is a file, not a folder"),
    ("special files and link loops", "hydra.run.dir is a link loop",
     lambda t: [f"hydra.run.dir={_loop(t)}"], "symbolic link loop"),
    ("special files and link loops", "hydra.sweep.dir is an existing file",
     lambda t: ["--multirun", "seed=1,2", f"hydra.sweep.dir={_write(t / 'f', 'x')}"],
     "is a file, not a folder"),
    ("special files and link loops", "the MLflow store is a link loop",
     lambda t: [f"mlflow.tracking_uri=sqlite:///{_loop(t)}"], "symbolic link loop"),
    ("special files and link loops", "the MLflow store is a device",
     lambda t: ["mlflow.tracking_uri=sqlite:////dev/null"], "not a regular file"),
    ("special files and link loops", "QPIPE_OUTPUTS is a link loop",
     lambda t: [f"+_outputs={_loop(t)}"], "QPIPE_OUTPUTS"),
]  # fmt: skip


@pytest.mark.parametrize(("family", "case", "make", "expect"), HOSTILE, ids=[c[1] for c in HOSTILE])
def test_hostile_configs_and_special_files_are_one_line(
    family, case, make, expect, micro, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # ./conf is the user's
    made = make(tmp_path)
    outputs = next((o.split("=", 1)[1] for o in made if o.startswith("+_outputs=")), None)
    made = [o for o in made if not o.startswith("+_outputs=")]
    if outputs is not None:
        monkeypatch.setenv("QPIPE_OUTPUTS", outputs)
    multi = [o for o in made if o.startswith("--")]
    made = [o for o in made if not o.startswith("--")]
    own_quant = any(o.startswith("quant=") for o in made)
    base = [o for o in micro if not (own_quant and o.startswith("quant"))]
    if not any(o.startswith("hydra.run.dir=") for o in made):
        made.append(f"hydra.run.dir={tmp_path / 'run'}")
    start = time.perf_counter()
    code, text = cli_in_process(*multi, *base, "pipeline=estimate", *made)
    seconds = time.perf_counter() - start
    assert code == 2, text[-3000:]
    line = _one_line(text)
    assert expect in line, line
    assert not (tmp_path / "run" / "run.json").exists(), "the run was opened"
    assert seconds < 30, f"{seconds:.0f} s: a hostile input must not take long"
    LOG.family(
        family,
        case,
        line.replace(str(tmp_path), "…"),
        code,
        "refused before the run opened",
        seconds=seconds,
    )
