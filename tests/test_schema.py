"""The typed config schema (qpipe/config/schema.py) knows every key the built-in configs set: a key
added to a YAML file without its schema entry would refuse every run that selects it."""

from __future__ import annotations

import pytest

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
