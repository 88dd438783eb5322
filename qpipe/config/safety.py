"""What qpipe lets a checkpoint do when it is opened: by default nothing but tensors.

``model.trust_remote_code=true`` allows a folder's own modelling code (config.json
``auto_map``) to run; ``model.allow_pickle=true`` allows pickled weights (``*.bin``, ``*.pt``),
whose loading can run code. The run sets the policy once from its config (``set_policy``);
loaders ask ``trust_remote_code()`` so that backends stay free of Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class LoadPolicy:
    trust_remote_code: bool = False
    allow_pickle: bool = False


_POLICY = LoadPolicy()


def policy_from(model_cfg: DictConfig) -> LoadPolicy:
    return LoadPolicy(
        trust_remote_code=model_cfg.get("trust_remote_code", False) is True,
        allow_pickle=model_cfg.get("allow_pickle", False) is True,
    )


def set_policy(policy: LoadPolicy) -> None:
    global _POLICY
    _POLICY = policy


def policy() -> LoadPolicy:
    return _POLICY


def trust_remote_code() -> bool:
    """The value every ``from_pretrained`` of qpipe passes as ``trust_remote_code``."""
    return _POLICY.trust_remote_code
