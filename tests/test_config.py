"""Config composition: defaults, both override forms, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from qpipe.config.compose import defaulted_groups, normalize_overrides
from qpipe.errors import ConfigError
from qpipe.preflight import validate_config
from tests.conftest import cli_in_process, compose_config


def test_defaults_compose() -> None:
    cfg = compose_config()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.quant.method == "none"
    assert cfg.hardware.name == "auto"
    assert cfg.pipeline == "default"


def test_plus_form_and_plain_form_give_the_same_config() -> None:
    plus = compose_config("+model=tiny_llama", "+quant=bnb_nf4", "+hardware=rtx4090_24gb")
    plain = compose_config("model=tiny_llama", "quant=bnb_nf4", "hardware=rtx4090_24gb")
    assert plus == plain
    assert plus.quant.quant_type == "nf4" and plus.hardware.memory_gb == pytest.approx(25.76)


def test_plus_keeps_its_meaning_for_new_keys() -> None:
    assert normalize_overrides(["+quant=gptq", "+foo.bar=1", "quant.bits=8"]) == [
        "quant=gptq",
        "+foo.bar=1",
        "quant.bits=8",
    ]
    assert {"model", "quant", "hardware", "eval"} <= defaulted_groups()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device=tpu", "device='tpu' is not valid"),
        ("dtype=float8", "dtype='float8' is not valid"),
        ("kernel=cutlass", "kernel='cutlass' is not valid"),
        ("workload.mode=training", "workload.mode='training' is not valid"),
        ("pad_align.mode=stretch", "pad_align.mode='stretch' is not valid"),
        ("quant.bits=3", "quant.bits=3 is not valid for bitsandbytes"),
        ("model.weights=fake", "model.weights='fake' is not valid"),
        ("pipeline=nope", "pipeline='nope' not found in ./pipelines or the built-ins"),
        ("eval.text=/no/such/file.txt", "eval.text='/no/such/file.txt'"),
    ],
)
def test_bad_values_fail_with_one_clear_line(override: str, message: str) -> None:
    cfg = compose_config("quant=bnb_nf4", override)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def _cli(*args: str, outputs: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``python -m qpipe args``, in this process: these tests are about how the command line is
    read and refused, not the process."""
    monkeypatch.setenv("QPIPE_OUTPUTS", outputs)
    monkeypatch.setenv("COLUMNS", "200")
    return cli_in_process(*args)


def test_keys_of_a_swept_group_are_forced_only_while_it_is_swept() -> None:
    args = ["model=qwen3_8b,tiny_llama", "model.tokenizer=qwen", "quant.group_size=64,128"]
    assert normalize_overrides(args) == [
        "model=qwen3_8b,tiny_llama",
        "++model.tokenizer=qwen",
        "quant.group_size=64,128",
    ]
    assert normalize_overrides(["model=tiny_llama", "eval.decode_batch_sizes=[1,4],[1]"]) == [
        "model=tiny_llama",
        "eval.decode_batch_sizes=[1,4],[1]",
    ]


def test_cli_sweep_over_models_takes_a_key_the_default_model_lacks(
    outputs_dir, monkeypatch
) -> None:
    # Hydra composes the sweep with the default model first (smollm2 has no `seed`); without
    # the rewrite to ++ the sweep stops there, before any job.
    args = ("--multirun", "model=tiny_llama,tiny_internvl", "model.seed=3", "pipeline=estimate")
    code, out = _cli(*args, outputs=str(outputs_dir), monkeypatch=monkeypatch)
    assert code == 0, out[-4000:]
    assert "2 jobs" in out
    code, out = _cli(
        "--multirun",
        "model=tiny_llama,tiny_internvl",
        "model.sed=3",
        outputs=str(outputs_dir),
        monkeypatch=monkeypatch,
    )
    assert code != 0 and "did you mean model.seed?" in out
    # The failed sweep's exit code belongs to that command, not to the next one in this process.
    code, out = _cli(
        "model=tiny_llama", "pipeline=estimate", outputs=str(outputs_dir), monkeypatch=monkeypatch
    )
    assert code == 0, out[-4000:]


def test_cli_unknown_option_lists_valid_ones(outputs_dir, monkeypatch) -> None:
    code, out = _cli("+model=llama9000", outputs=str(outputs_dir), monkeypatch=monkeypatch)
    assert code != 0
    assert "Available options in 'model'" in out
    assert "smollm2" in out and "internvl" in out


def test_cli_bad_value_is_one_line_without_traceback(outputs_dir, monkeypatch) -> None:
    args = ("quant=bnb_nf4", "quant.quant_type=nf5")
    code, out = _cli(*args, outputs=str(outputs_dir), monkeypatch=monkeypatch)
    assert code == 2
    assert "quant.quant_type='nf5' is not valid for 4-bit bitsandbytes; use nf4 or fp4" in out
    assert "Traceback" not in out


def test_cli_internvl_without_hub_names_the_offline_alternatives(outputs_dir, monkeypatch) -> None:
    args = ("+model=internvl", "+quant=bnb_nf4")
    code, out = _cli(*args, outputs=str(outputs_dir), monkeypatch=monkeypatch)
    assert code == 1
    assert "cannot fetch weights of 'OpenGVLab/InternVL3_5-8B-HF'" in out
    assert "model.weights=random" in out and "model.path=" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("quant=gptq", "quant.bits=5"), "quant.bits=5 is not valid for gptq; use 2, 3, 4 or 8"),
        (("quant=rtn", "quant.bits=3", "quant.format=qpipe-w4"), "holds 4-bit weights"),
        (("quant=rtn", "quant.format=qpipe-w4", "kernel=hf"), "kernel=hf cannot load"),
        (("quant=gptq", "calib.num_samples=0"), "calib.num_samples=0 is not valid"),
        (("quant=awq", "quant.group_size=100"), "group_size"),
    ],
)
def test_bad_quantizer_settings_fail_before_any_work(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(*overrides))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
