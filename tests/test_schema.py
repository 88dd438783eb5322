"""The typed config schema (qpipe/config/schema.py) knows every key the built-in configs set: a key
added to a YAML file without its schema entry would refuse every run that selects it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from qpipe.backends import get_backend, methods, quant_options
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
    from qpipe.config.settings import resolve_settings as resolve

    def resolve_settings(cfg):
        return resolve(cfg, get_backend)

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
    assert eight.budget_kernel == "triton"  # 8-bit layers run on the Triton W8A16 kernel
    with pytest.raises(ConfigError, match="kernel=triton needs a CUDA device"):
        resolve_settings(compose_config("model=tiny_llama", "quant=gptq", "kernel=triton"))
    # FP8 runs weight-only here, on FP8 tensor cores on the GPU it plans for
    fp8 = resolve_settings(compose_config("model=tiny_llama", "quant=fp8", "hardware=h100_80gb"))
    assert (fp8.kernel, fp8.budget_kernel) == ("torch", "scaled_mm")
    with pytest.raises(ConfigError, match="kernel=scaled_mm needs FP8 tensor cores"):
        resolve_settings(compose_config("model=tiny_llama", "quant=fp8", "kernel=scaled_mm"))
    # quant=none runs no kernel of qpipe's: a kernel some backend runs is accepted, a typo not
    assert resolve_settings(compose_config("quant=none", "kernel=torch")).kernel == "dense"
    with pytest.raises(ConfigError, match="kernel='trition' is not valid"):
        resolve_settings(compose_config("quant=none", "kernel=trition"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.act_ordr=group", "quant.act_ordr is not an option of quant=gptq"),
        ("quant.act_ordr=group", "did you mean quant.act_order?"),
        ("quant.dampening=lots", "quant.dampening='lots' is not valid for quant=gptq"),
        ("quant.quant_type=nf4", "quant.quant_type is not an option of quant=gptq"),
    ],
)
def test_a_methods_own_options_are_typed_by_its_backend(override: str, message: str) -> None:
    from qpipe.config.settings import resolve_settings

    with pytest.raises(ConfigError) as err:
        resolve_settings(compose_config("model=tiny_llama", "quant=gptq", override), get_backend)
    assert message in str(err.value) and "\n" not in str(err.value)


def _option_of(method: str) -> str:
    return next(o for o, m in quant_options().items() if m == method)


@pytest.mark.parametrize("method", methods())
def test_every_backend_states_the_facts_qpipe_asks(method: str) -> None:
    """The facts about a method live on its backend: every backend answers every one."""
    from qpipe.backends.base import Backend

    backend = get_backend(method)
    for fact in Backend.__annotations__:
        assert hasattr(backend, fact), f"{method} lacks {fact}"
    quant = OmegaConf.to_container(compose_config(f"quant={_option_of(method)}").quant)
    assert isinstance(backend.needs_calibration(quant), bool)
    assert backend.kernels and all(isinstance(b, int) for b in backend.bit_widths)
