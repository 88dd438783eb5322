"""The user's own configs, pipelines and stages, from the working directory: searched before the
built-ins, one YAML file per pipeline, ``uses: pkg.module`` stages with the built-ins' contract;
and the repository's worked examples (top-level conf/, pipelines/, local_stages/) run as is."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient
from transformers import AutoTokenizer

from qpipe.config.compose import load_model_group
from qpipe.dag import PipelineError, load_dag
from qpipe.models import materialize
from tests.conftest import cli_in_process, save_random_llama

ROOT = Path(__file__).resolve().parents[1]

STAGE = """
from qpipe.stages.base import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    est = ctx.output("memory_budget", "estimate")
    return StageResult(outputs={"seen": True}, metrics={"user.weights_gb": est["weights_gb"]})
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def user_project(root: Path, package: str) -> Path:
    """A working directory with its own model config, pipeline and stage package."""
    write(root / package / "__init__.py", "")
    write(root / package / "stages" / "__init__.py", "")
    write(root / package / "stages" / "report_weights.py", STAGE)
    write(root / package / "stages" / "no_run.py", "VALUE = 1\n")
    write(
        root / "pipelines" / "estimate_plus.yaml",
        f"""
        name: estimate_plus
        stages:
          env_check: {{}}
          memory_budget: {{needs: [env_check]}}
          report: {{needs: [memory_budget], uses: {package}.stages.report_weights}}
        """,
    )
    # Shadows the built-in tiny_llama: the working directory's conf/ comes first.
    write(
        root / "conf" / "model" / "tiny_llama.yaml",
        """
        name: users-tiny
        weights: random
        seed: 0
        random_dtype: float32
        tokenizer: smollm2
        model_class: AutoModelForCausalLM
        task: causal-lm
        config: {model_type: llama, hidden_size: 128, intermediate_size: 256,
                 num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1,
                 head_dim: 64, vocab_size: 49152, tie_word_embeddings: false}
        """,
    )
    return root


def test_user_pipeline_is_found_first_and_names_user_code(tmp_path, monkeypatch) -> None:
    user_project(tmp_path, "userpkg_a")
    write(tmp_path / "pipelines" / "estimate.yaml", "stages: {env_check: {}}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    dag = load_dag("estimate_plus")
    assert dag.order == ["env_check", "memory_budget", "report"]
    assert dag.stages["report"].module == "userpkg_a.stages.report_weights"
    assert load_dag("estimate").order == ["env_check"]  # ./pipelines/estimate.yaml wins
    assert load_dag(str(tmp_path / "pipelines" / "estimate_plus.yaml")).name == "estimate_plus"


@pytest.mark.parametrize(
    ("uses", "message"),
    [
        ("userpkg_b.stages.nope", "uses 'userpkg_b.stages.nope', which cannot be imported"),
        ("userpkg_b.stages.no_run", "which has no run(ctx) function"),
        ("no_such_stage", "uses unknown stage code 'no_such_stage'"),
    ],
)
def test_bad_user_stage_is_one_line(uses: str, message: str, tmp_path, monkeypatch) -> None:
    user_project(tmp_path, "userpkg_b")
    write(tmp_path / "pipelines" / "bad.yaml", f"stages: {{s: {{uses: {uses}}}}}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PipelineError) as err:
        load_dag("bad")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_pipeline_lists_user_and_builtin_names(tmp_path, monkeypatch) -> None:
    user_project(tmp_path, "userpkg_c")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="known: default, estimate, estimate_plus"):
        load_dag("nope")


def run_cli(cwd: Path, outputs: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    """``python -m qpipe args`` from ``cwd`` with its own outputs folder, in this process: these
    tests are about the configs, pipelines and stages found there, not the process."""
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))  # what `python -m` puts first: the user's packages
    monkeypatch.setenv("QPIPE_OUTPUTS", str(outputs))
    monkeypatch.setenv("COLUMNS", "250")
    return cli_in_process(*args)


def test_cli_runs_the_users_config_pipeline_and_stage(tmp_path: Path, monkeypatch) -> None:
    project = user_project(tmp_path / "project", "userpkg_d")
    outputs = tmp_path / "outputs"
    code, out = run_cli(project, outputs, monkeypatch, "model=tiny_llama", "pipeline=estimate_plus")
    assert code == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("qpipe").experiment_id])
    assert run.data.params["model"] == "users-tiny"  # the user's conf/, not the built-in
    assert run.data.params["pipeline"] == "estimate_plus"
    assert run.data.metrics["user.weights_gb"] == run.data.metrics["mem.est_weights_gb"]
    assert "time.report_s" in run.data.metrics


@pytest.mark.slow
def test_repository_worked_examples_run(tmp_path: Path, monkeypatch) -> None:
    """conf/model/my_checkpoint.yaml + pipelines/estimate_then_quantize.yaml + its user stage
    (local_stages/savings.py), from the repository root as the README shows them."""
    folder = save_random_llama(
        tmp_path / "my-model",
        # big enough that 4-bit layers outweigh the fused MLP's extra activation, small
        # enough that the untied embeddings keep the saving under the default 30 %
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=False,
    )
    AutoTokenizer.from_pretrained(materialize(load_model_group("smollm2"))).save_pretrained(folder)
    outputs = tmp_path / "outputs"
    common = ("model=my_checkpoint", f"model.path={folder}", "pipeline=estimate_then_quantize")
    code, out = run_cli(ROOT, outputs, monkeypatch, *common, "quant=rtn", "+savings.min_pct=0")
    assert code == 0, out[-3000:]
    for stage in ("savings", "quantize", "load", "validate_vram"):
        assert f"✔ {stage}" in out
    # The default threshold: this tiny model's embeddings dominate, quantizing saves too little.
    code, out = run_cli(ROOT, outputs, monkeypatch, *common, "quant=rtn")
    assert code == 1, out[-3000:]
    assert "less than savings.min_pct=30: not worth quantizing" in " ".join(out.split())
    assert "▶ quantize" not in out
