"""A quant method is one backend module and one YAML: everything about it lives there.

- A backend brought from outside the package (the way ``uses:`` brings a user's stage), with
  only its module and its ``conf/quant/<option>.yaml``, runs the default pipeline on CPU: it
  is validated, priced, quantized, loaded, measured and benchmarked like the built-ins.
- Inside ``qpipe/``, no quant method is named outside ``backends/`` and ``conf/``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qpipe.backends import methods
from tests.conftest import cli_in_process

QPIPE = Path(__file__).resolve().parents[1] / "qpipe"

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _doc_block(language: str, after: str) -> str:
    """The first ``language`` code block of docs/extending.md after the line ``after``: the
    example the docs show is the one this test runs."""
    text = DOC.read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start : text.index("```", start)]


SMALL = (
    "model=tiny_llama",
    "eval=quick",
    "eval.max_tokens=128",
    "eval.window=64",
    "eval.prefill_tokens=16",
    "eval.max_new_tokens=2",
    "eval.decode=eager",
    "workload.context_len=128",
)


def user_backend(project: Path) -> list[Path]:
    """The two files a method of one's own is: docs/extending.md's module and its YAML."""
    (project / "conf" / "quant").mkdir(parents=True)
    code = project / "rowint8_backend.py"
    code.write_text(_doc_block("python", "## A backend in one module"))
    yaml = project / "conf" / "quant" / "rowint8.yaml"
    yaml.write_text(_doc_block("yaml", "and this YAML"))
    return [code, yaml]


def run_cli(cwd: Path, outputs: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("QPIPE_OUTPUTS", str(outputs))
    monkeypatch.setenv("COLUMNS", "250")
    return cli_in_process(*args)


def test_a_backend_from_outside_the_package_runs_the_default_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    files = user_backend(project)
    assert (
        sorted(p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file())
        == [
            "conf/quant/rowint8.yaml",
            "rowint8_backend.py",
        ]
        and len(files) == 2
    )
    outputs = tmp_path / "outputs"
    code, out = run_cli(project, outputs, monkeypatch, "quant=rowint8", *SMALL)
    assert code == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("qpipe").experiment_id])
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["quant"] == "rowint8" and params["quant.method"] == "rowint8"
    assert params["kernel"] == "torch"  # what its layers ran on
    # Priced in its own format: the weights the budget estimated are the weights loaded.
    assert metrics["mem.est_weights_gb"] == pytest.approx(metrics["mem.loaded_weights_gb"], 1e-3)
    assert "perf.decode_tok_s_eager" in metrics
    # Its option was checked by its own Options, before the run opened.
    code, out = run_cli(project, outputs, monkeypatch, "quant=rowint8", "quant.clp=0.5", *SMALL)
    assert code != 0 and "quant.clp is not an option of quant=rowint8" in out
    assert "did you mean quant.clip?" in out and "Traceback" not in out
    code, out = run_cli(project, outputs, monkeypatch, "quant=rowint8", "quant.clip=2", *SMALL)
    assert code != 0 and "quant.clip=2.0 is not valid; use a number in (0, 1]" in out


def _docstrings(tree: ast.AST) -> set[int]:
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, owners) and node.body and isinstance(node.body[0], ast.Expr):
            value = node.body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def method_names_outside_the_backends() -> list[str]:
    """Every place in qpipe's code (docstrings and comments aside) outside ``backends/`` and
    ``conf/`` that names a quant method: a string holding a method's name as an identifier
    (``"gptq"``, ``"bnb_nf4"``, ``"quant=rtn"``; an algorithm named in prose, "GPTQ weights",
    is not a method), or ``none``/``auto`` compared with a method or used as an option's key."""
    distinctive = set(methods()) - {"none", "auto"}
    generic = {"none", "auto"}
    found = []
    for path in sorted(QPIPE.rglob("*.py")):
        rel = path.relative_to(QPIPE)
        if rel.parts[0] in ("backends", "conf"):
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docs
            ):
                words = re.findall(r"[A-Za-z0-9_]+", node.value)
                if any(w == m or w.startswith(m + "_") for w in words for m in distinctive):
                    found.append(f"{rel}:{node.lineno}: {node.value!r}")
            sides = []
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
            elif isinstance(node, ast.Subscript):
                sides = [node.value, node.slice]
            names = [s.value for s in sides if isinstance(s, ast.Constant) and s.value in generic]
            if names and re.search(r"method|option", ast.unparse(node)):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_quant_method_is_named_outside_the_backends() -> None:
    assert {"bnb", "gptq", "awq", "rtn", "fp8"} <= set(methods())  # the scan knows them
    assert method_names_outside_the_backends() == []
