"""Issue 24: what a person reads in the terminal. The report as wide as the terminal (80 and
120 columns, real rich, a real MLflow store), library noise kept off the terminal and in the
run's log file (the real libraries where they can be made to speak here), progress bars in a
log, the heartbeat, the run summary, the cache command, the Pareto plot's labels."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console
from rich.logging import RichHandler

from qpipe import cache as cache_cli
from qpipe import report
from qpipe.console.noise import NOISE, quiet_progress_bars, terminal_for_run
from qpipe.console.progress import heartbeat
from qpipe.plots.pareto import Point, pareto_figure
from qpipe.sweep import runs_page, swept_axes
from qpipe.tracking.runs import Tracker

LONG_ERROR = (
    "quantize: RuntimeError: Cannot access accelerator device when none is available\n"
    "while pinning the cached activations\n" + "more words " * 40
)
# The library lines the issue names, as each library says them.
NAMED = {
    "transformers": "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer",
    "bitsandbytes": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "mlflow": "Creating initial MLflow database tables",
    "inductor": "TensorFloat32 tensor cores for float32 matrix multiplication available",
    "llm-compressor": "No accelerator available! Compressing model on CPU instead",
}


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def _bpe_decode_with_cleanup() -> None:
    """transformers' own warning: decode() of a BPE tokenizer asked to clean up spaces."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):  # transformers (or auto-round) shows it once a process
        once.cache_clear()
    backend = Tokenizer(BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=True)
    tok.decode([2, 0])


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run's worth of output with Hydra's two handlers (rich console, log file): a fresh
    MLflow store made inside the run (its setup lines), the named library lines, one real
    library warning and qpipe's own lines. The store then gets a tiny sweep for the report."""
    folder = tmp_path_factory.mktemp("terminal")
    screen = io.StringIO()
    console = RichHandler(console=Console(file=screen, width=80), show_path=False)
    log_file = folder / "qpipe.log"
    file = logging.FileHandler(log_file)
    file.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers, root.level = [console, file], logging.INFO
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        with terminal_for_run(log_file):
            logging.getLogger("qpipe").info("▶ a stage of qpipe")
            Tracker(uri, "sweeps")  # a first run: MLflow creates its tables
            _bpe_decode_with_cleanup()
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make "
                "sure you already `pip install kernels` and the kernels >= 0.11.1",
                "ConnectError",
            )
            warnings.warn(
                "TensorFloat32 tensor cores for float32 matrix multiplication available but not "
                "enabled. Consider setting `torch.set_float32_matmul_precision('high')`",
                UserWarning,
                stacklevel=1,
            )
            from loguru import logger

            logger.remove()  # what llm-compressor's import does, then its own stdout sink
            logger.add(sys.stdout, level="INFO")
            logger.warning("No accelerator available! Compressing model on CPU instead")
            logger.info("Compression lifecycle reset")
            logging.getLogger("accelerate").warning("a library warning worth reading")
            logging.getLogger("qpipe").error("✘ quantize: the failure (printed by the summary)")
    finally:
        root.handlers, root.level = saved
        file.close()
    _sweep_runs(uri)
    return {"screen": screen.getvalue(), "log": log_file.read_text(), "uri": uri}


def _sweep_runs(uri: str) -> None:
    """A parent and four children (one failed, with a long error), and an experiment of loose
    runs with no sweep."""
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("sweeps").experiment_id
    parent = c.create_run(
        exp,
        run_name="sweep quant=none,rtn,gptq,awq (17-07-11)",
        tags={"qpipe.role": "parent", "qpipe.sweep": "17-07-11", "qpipe.sweep_axes": "quant=…"},
    )
    rows = [
        ("none", None, 0.538, 0.0, 18.5),
        ("rtn", 4, 0.175, 28.7, 2.3),
        ("gptq", 4, 0.175, 5.9, 1.8),
        ("awq", 4, None, None, None),
    ]
    for quant, bits, peak, delta, speed in rows:
        name = f"smollm2-135m/{quant}" + (f"-w{bits}" if bits else "")
        tags = {"mlflow.parentRunId": parent.info.run_id, "qpipe.sweep": "17-07-11"}
        run = c.create_run(exp, run_name=name, tags=tags).info.run_id
        params = {"model": "smollm2-135m", "quant": quant, "quant.method": quant}
        params |= {"quant.bits": bits, "kernel": "torch", "device": "cpu"}
        for key, value in params.items():
            c.log_param(run, key, value)
        if peak is None:
            c.set_tag(run, "qpipe.failure", LONG_ERROR)
            c.set_terminated(run, "FAILED")
            continue
        metrics = {
            "mem.measured_peak_gb": peak,
            "mem.est_peak_gb": peak * 0.9,
            "mem.est_weights_gb": peak * 0.8,
            "quality.ppl": 21.24 * (1 + delta / 100),
            "quality.ppl_delta_pct": delta,
            "quality.ppl.pydocs": 13.8 * (1 + delta / 100),
            "quality.kld": delta / 100,
            "perf.decode_tok_s": speed,
            "time.quantize_s": 73.5,
        }
        for key, value in metrics.items():
            c.log_metric(run, key, value)
        c.set_terminated(run, "FINISHED")
    c.set_terminated(parent.info.run_id, "FINISHED")
    loose = c.create_experiment("loose")
    for quant in ("none", "bnb_nf4"):
        run = c.create_run(loose, run_name=f"tiny-llama/{quant}").info.run_id
        c.log_param(run, "model", "tiny-llama")
        c.log_param(run, "quant", quant)
        c.log_param(run, "model.weights", "random")
        c.log_metric(run, "mem.measured_peak_gb", 0.1)
        c.log_metric(run, "quality.ppl_delta_pct", 3.0)
        c.set_terminated(run, "FINISHED")


def test_named_library_lines_reach_the_log_file_not_the_terminal(session: dict) -> None:
    screen, log = " ".join(session["screen"].split()), " ".join(session["log"].split())
    for library, text in NAMED.items():
        assert text not in screen, f"{library}'s line reached the terminal:\n{screen}"
        assert text in log, f"{library}'s line is missing from the run's log file"
    assert "Compression lifecycle reset" in log and "Compression lifecycle" not in screen
    # What qpipe says, and what a library says that matters, still come through.
    assert "▶ a stage of qpipe" in screen
    assert "a library warning worth reading" in screen
    # The failure is printed once, by the summary, not by the log handler too.
    assert "the failure (printed by the summary)" not in screen
    assert "the failure (printed by the summary)" in log
    # One line says where the held-back messages are.
    # (the 80-column screen may fold the log file's path anywhere: compare without spaces)
    folded = "".join(screen.split())
    assert "librarymessagesarein" in folded and "qpipe.logonly(mlflow2" in folded
    assert all(pattern.pattern for _, pattern in NOISE)


def test_library_loggers_get_their_own_handlers_back(session: dict) -> None:
    mlflow_logger = logging.getLogger("mlflow")
    assert mlflow_logger.handlers and mlflow_logger.propagate is False


@pytest.mark.parametrize("width", [80, 120])
def test_report_fits_the_terminal_and_ends_with_a_verdict(session: dict, width, tmp_path) -> None:
    screen = io.StringIO()
    out = tmp_path / "cmp"
    report.main(
        ["--experiment", "sweeps", "--tracking-uri", session["uri"], "--out", str(out)],
        console=Console(file=screen, width=width),
    )
    lines = [line for line in _lines(screen.getvalue()) if not line.startswith("wrote ")]
    assert max(len(line) for line in lines) <= width, screen.getvalue()
    text = " ".join(screen.getvalue().split())
    # It says what it shows.
    assert "latest sweep 17-07-11 of experiment sweeps" in text and "4 runs" in text
    # Names whole, without the model (said once in the title); the error on one line.
    for name in ("none", "rtn-w4", "gptq-w4", "awq-w4"):
        assert any(f" {name} " in line for line in lines), name
    failed = next(line for line in lines if " awq-w4 " in line)
    assert "quantize: RuntimeError: Can" in failed and failed.rstrip(" │").endswith("…")
    assert "more words" not in screen.getvalue().replace(failed, "")  # not wrapped on
    # The verdict: the front and the best run on each axis.
    start = next(i for i, line in enumerate(lines) if line.startswith("best: "))
    verdict = " ".join(lines[start:])
    assert len(lines) - start <= (2 if width == 80 else 1)  # the last line(s), one sentence
    assert "best: memory gptq-w4" in text and "quality none" in text and "speed none" in text
    assert "Pareto front" in verdict and "gptq-w4, none" in verdict
    # The files hold every column, and the error whole.
    csv = out.with_suffix(".csv").read_text()
    assert " ".join(LONG_ERROR.split()) in " ".join(csv.split())
    assert "est weights GB" in csv and "quantize s" in csv
    columns = next(line for line in lines if "┳" in line).count("┳") + 1
    assert columns >= 6  # status, run, failure, peak, ppl Δ, decode speed at the least
    if width == 80:
        assert "not shown at this width:" in text


def test_report_width_grows_with_the_terminal(session: dict) -> None:
    def header_cells(width: int) -> int:
        screen = io.StringIO()
        args = ["--experiment", "sweeps", "--tracking-uri", session["uri"]]
        report.main(args, console=Console(file=screen, width=width))
        return next(line for line in _lines(screen.getvalue()) if "┳" in line).count("┳")

    assert header_cells(120) > header_cells(80)


def test_report_without_a_sweep_says_it_lists_every_run(session: dict) -> None:
    screen = io.StringIO()
    report.main(
        ["--experiment", "loose", "--tracking-uri", session["uri"]],
        console=Console(file=screen, width=80),
    )
    text = " ".join(screen.getvalue().split())
    assert "every run of experiment loose (it has no sweep yet): 2 runs" in text
    # Random weights: perplexity is noise, marked so and kept out of the verdict.
    assert "ppl Δ%" not in text and "quality ignored for 2 random-weight runs" in text


def test_report_help_is_whole() -> None:
    screen = io.StringIO()
    with pytest.raises(SystemExit), _redirect(screen):
        report.main(["--help"])
    text = screen.getvalue()
    assert "every column whole." in text
    assert "write the runs (every param/metric) as JSON" in text
    assert "write the whole table as Markdown" in text


class _redirect:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def __enter__(self) -> None:
        self.saved, sys.stdout = sys.stdout, self.stream

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self.saved


def test_progress_bars_in_a_log_are_one_line_each(capsys, caplog) -> None:
    from tqdm import tqdm

    caplog.set_level(logging.INFO)
    with quiet_progress_bars(terminal=False):
        for _ in tqdm(range(300), desc="Calibrating", mininterval=0):
            pass
    assert "Calibrating" not in capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records if "Calibrating" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("Calibrating: 300/300 (")
    # On a terminal the bar is the library's own.
    with quiet_progress_bars(terminal=True):
        for _ in tqdm(range(3), desc="Drawing"):
            pass
    assert "Drawing" in capsys.readouterr().err


def test_heartbeat_speaks_when_the_terminal_is_quiet() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers, root.level = [handler], logging.INFO
    try:
        with heartbeat(
            lambda: "benchmark", quiet_s=0.3, hints={"benchmark": "try X"}, enabled=True
        ):
            time.sleep(1.2)
    finally:
        root.handlers, root.level = saved
    beats = [line for line in _lines(stream.getvalue()) if "benchmark: still running" in line]
    assert len(beats) >= 2, stream.getvalue()
    assert sum("try X" in line for line in beats) == 1  # the hint once
    with heartbeat(lambda: "benchmark", quiet_s=0.1, enabled=False):
        time.sleep(0.3)  # not a terminal: nothing
    assert stream.getvalue().count("still running") == len(beats)


def test_summary_labels_numbers_and_keeps_the_hint_whole(tmp_path) -> None:
    from qpipe.app import print_summary
    from qpipe.runner import RunReport
    from qpipe.stages.base import StageResult
    from tests.conftest import compose_config

    metrics = {
        "mem.est_weights_gb": 17.06,
        "mem.est_peak_gb": 17.55,
        "mem.est_runtime_gb": 0.55,
        "mem.est_total_gb": 18.10,
        "quality.ppl": 50220.0,
    }
    budget = StageResult(
        outputs={
            "verdict": "fits on one rtx4090_24gb card: 18.10 GB estimated (peak 17.55 + runtime "
            "0.55) of 24.47 usable",
            "options": {"none": 18.1, "bnb_nf4": 7.2, "awq": 7.4},
            "usable_gb": 24.47,
        }
    )
    done = RunReport(status="FINISHED", results={"memory_budget": budget}, metrics=metrics)
    done.run_id, done.ui_hint = "abc", f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/x.db"
    screen = io.StringIO()
    print_summary(compose_config("model=tiny_llama"), done, Console(file=screen, width=80))
    lines = _lines(screen.getvalue())
    assert f"  {done.ui_hint}" in lines  # one line, whatever its length
    assert all(len(line) <= 80 for line in lines if "mlflow ui" not in line), lines
    text = screen.getvalue()
    assert "peak, estimated (no runtime)" in text and "17.55 GB" in text
    assert "peak + 0 reserve + 0.55 runtime, est." in text and "18.10 GB" in text
    assert "bnb_nf4" in text and "none (this run)" in text  # every option, nothing loaded
    # Random weights: perplexity is left out, and the summary says why.
    assert "perplexity" not in text and "random weights (model.weights=random)" in text


def _tree(path: Path, size: int = 1000, age_s: float = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "data.bin").write_bytes(b"\0" * size)
    then = time.time() - age_s
    for item in (path / "data.bin", path):
        os.utime(item, (then, then))
    return path


def test_cache_command_lists_and_clears(tmp_path) -> None:
    root = tmp_path / "outputs"
    cache = root / "cache"
    _tree(cache / "stages" / "quantize" / "aaaa1111", 3000)
    _tree(cache / "stages" / "quantize" / "bbbb2222", 2000)
    _tree(cache / "models" / "smollm2-135m-gguf-1234", 5000)
    _tree(cache / "stages" / "quantize" / "cccc3333.partial-77-x1", 700)  # being written now
    _tree(cache / "models" / "old-model.partial-1", 900, age_s=3 * 86400)  # a killed writer's
    _tree(cache / "matplotlib", 10)
    _tree(cache / "torchinductor", 40)  # compiled work: only --compiled or --all
    _tree(cache / "kernel_tuning", 20)
    record = root / "runs" / "2026-12-02" / "10-00-00-x" / "logged" / "stages" / "quantize.json"
    record.parent.mkdir(parents=True)
    record.write_text(f'{{"checkpoint": "{cache}/stages/quantize/aaaa1111/checkpoint"}}')

    screen = io.StringIO()
    cache_cli.main(["--outputs", str(root)], console=Console(file=screen, width=80))
    text = screen.getvalue()
    assert "in 6 entries (+2 in progress)" in text
    assert max(len(line) for line in _lines(text)) <= 80
    rows = {line.split("│")[2].strip(): line for line in _lines(text) if line.count("│") == 6}
    assert "yes" in rows["aaaa1111"] and " no " in rows["bbbb2222"]
    assert "writing" in rows["cccc3333.partial-77-x1"] and "—" in rows["matplotlib"]
    assert "python -m qpipe.cache clear --unreferenced" in text
    assert "python -m qpipe.cache clear --all" in text
    assert "python -m qpipe.cache clear --compiled" in text
    assert "compiled" in rows["torchinductor"] and "—" in rows["kernel_tuning"]

    cache_cli.main(
        ["clear", "--unreferenced", "--outputs", str(root)], console=Console(file=io.StringIO())
    )
    left = sorted(str(p.relative_to(cache)) for p in cache.glob("*/*") if p.name != "data.bin")
    left += sorted(str(p.relative_to(cache)) for p in cache.glob("stages/*/*"))
    assert (cache / "stages/quantize/aaaa1111").is_dir()  # referenced
    assert (cache / "stages/quantize/cccc3333.partial-77-x1").is_dir()  # in progress, young
    assert (cache / "matplotlib").is_dir()  # a library's cache: only --all
    assert not (cache / "stages/quantize/bbbb2222").exists()
    assert not (cache / "models/smollm2-135m-gguf-1234").exists()
    assert not (cache / "models/old-model.partial-1").exists()  # old: no writer left
    assert (cache / "torchinductor").is_dir() and (cache / "kernel_tuning").is_dir()

    cache_cli.main(
        ["clear", "--compiled", "--outputs", str(root)], console=Console(file=io.StringIO())
    )
    assert not (cache / "torchinductor").exists() and not (cache / "kernel_tuning").exists()
    assert (cache / "matplotlib").is_dir() and (cache / "stages/quantize/aaaa1111").is_dir()

    cache_cli.main(["clear", "--all", "--outputs", str(root)], console=Console(file=io.StringIO()))
    assert not cache_cli.survey(root)


def test_pareto_labels_and_legend_cover_no_point() -> None:
    import matplotlib.pyplot as plt

    from qpipe.plots.pareto import _marker_box

    # The bit-width sweep on SmolLM2: 4- and 8-bit runs crowd one corner.
    pts = [
        Point("gptq-w2", 0.289, 5355037.3, 0.13),
        Point("gptq-w3", 0.283, 118.0, 0.10),
        Point("gptq-w4", 0.341, 11.6, 0.18),
        Point("rtn-w2", 0.332, 2829264.7, 0.38),
        Point("rtn-w3", 0.417, 191.8, 0.08),
        Point("rtn-w4", 0.338, 25.7, 0.12),
        Point("rtn-w8", 0.523, 0.4, 0.10),
        Point("none", 0.538, 0.0, None),
        Point("awq-w4", 0.340, 13.4, 0.11),
    ]
    fig = pareto_figure(pts, "sweep bits")
    try:
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        markers = [_marker_box(ax, (p.memory_gb, p.quality_loss), 50) for p in pts]
        labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
        assert set(labels) == {p.label for p in pts}
        for name, box in labels.items():
            hit = [p.label for p, m in zip(pts, markers, strict=True) if box.overlaps(m)]
            assert not hit, f"label {name} covers {hit}"
            assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
        legend = fig.legends[0].get_window_extent(renderer)
        assert not any(legend.overlaps(m) for m in markers)
    finally:
        plt.close(fig)
    assert (
        report.label(
            {"params.quant": "rtn", "params.quant.method": "rtn", "params.quant.bits": "4"}
        )
        == "rtn-w4"
    )


def test_sweep_axes_and_runs_page() -> None:
    preset = {"quant": "gptq,rtn", "quant.bits": "2,3,4,8"}
    assert swept_axes(["quant=rtn", "+model=tiny_llama"], preset) == {
        "quant.bits": ["2", "3", "4", "8"]
    }
    assert swept_axes(["quant=none,bnb_nf4"], {}) == {"quant": ["none", "bnb_nf4"]}
    assert runs_page("sqlite:///x.db", "3") == "http://127.0.0.1:5000/#/experiments/3/runs"
    assert runs_page("http://host:5000/", "3") == "http://host:5000/#/experiments/3/runs"
