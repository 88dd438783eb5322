"""The typed config schema (qpipe/config/schema.py) knows every key the built-in configs set: a key
added to a YAML file without its schema entry would refuse every run that selects it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from qpipe.backends import METHODS, get_backend
from qpipe.config.compose import CONF_DIR
from qpipe.config.schema import check_schema
from qpipe.errors import ConfigError
from tests.conftest import compose_config

OPTIONS = [
    f"+{group.name}={path.stem}"  # `+` as users write it (rewritten for defaulted groups)
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    for path in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_built_in_option_fits_the_schema(option: str) -> None:
    check_schema(compose_config(option))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+eval.max_token=100", "did you mean eval.max_tokens?"),
        ("quant.bits=abc", "quant.bits='abc' is not valid"),
        ("+model.trust_remote_code=perhaps", "model.trust_remote_code='perhaps' is not valid"),
    ],
)
def test_schema_refuses_unknown_keys_and_wrong_types(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_schema(compose_config("quant=none", override))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's device is the CPU here")
def test_settings_resolve_auto_once_for_this_machine_and_for_the_budget() -> None:
    """``auto`` becomes this machine's device and kernel; a named GPU is priced on CUDA with
    the kernel it would run there, wherever qpipe plans it from."""
    from qpipe.config.settings import resolve_settings

    here = resolve_settings(compose_config("model=tiny_llama", "quant=gptq"))
    assert (here.device, here.kernel, here.budget_device) == ("cpu", "torch", "cpu")
    assert here.dtype == torch.float32 and here.dtype_name == "float32"
    assert here.quant.method == "gptq" and here.quant.bits == 4
    assert here.model_class == "AutoModelForCausalLM" and here.task == "causal-lm"
    card = resolve_settings(
        compose_config("model=tiny_llama", "quant=gptq", "hardware=rtx4090_24gb")
    )
    assert (card.device, card.kernel) == ("cpu", "torch")
    assert (card.budget_device, card.budget_kernel) == ("cuda", "triton")
    assert card.budget_dtype == torch.bfloat16
    eight = resolve_settings(
        compose_config("model=tiny_llama", "quant=gptq", "quant.bits=8", "hardware=rtx4090_24gb")
    )
    assert eight.budget_kernel == "torch"  # the Triton path of the estimate is 4-bit only
    with pytest.raises(ConfigError, match="kernel=triton needs a CUDA device"):
        resolve_settings(compose_config("model=tiny_llama", "kernel=triton"))


_OPTION_OF = {"bnb": "bnb_nf4"}  # the methods whose option has another name


@pytest.mark.parametrize("method", METHODS)
def test_every_backend_states_the_facts_qpipe_asks(method: str) -> None:
    """The facts about a method live on its backend: every backend answers every one."""
    from qpipe.backends.base import Backend

    backend = get_backend(method)
    for fact in Backend.__annotations__:
        assert hasattr(backend, fact), f"{method} lacks {fact}"
    quant = OmegaConf.to_container(compose_config(f"quant={_OPTION_OF.get(method, method)}").quant)
    assert isinstance(backend.needs_calibration(quant), bool)
    assert backend.kernels and all(isinstance(b, int) for b in backend.bit_widths)
