"""YAML that cannot hang qpipe. A config is user input and may come from someone else's
repository: a "billion laughs" file (anchors nesting anchors: a few hundred bytes that expand
to 10⁹ nodes) made OmegaConf build nodes until memory ran out, and a file nested ten thousand
levels deep ends in a RecursionError.

Every YAML file qpipe or Hydra reads from the user — pipelines, ``conf/`` groups (the model and
quant configs), ``--config-dir`` — is first read with a size bound and walked as a stream of
parser events (no recursion, no node built), counting the nodes it would expand to (an alias
counts what its anchor holds) and its depth; past a limit it is refused in one line, before
PyYAML, OmegaConf or Hydra build anything from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qpipe.config.pathcheck import MiB, read_bounded, require_file
from qpipe.errors import ConfigError

MAX_BYTES = MiB  # qpipe's largest config is a few kB
MAX_NODES = 200_000  # after alias expansion; a config holds hundreds
MAX_DEPTH = 64  # a config nests a few levels


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when there


class YamlRefused(ConfigError):
    """A YAML file past qpipe's limits."""


def check_yaml_text(text: str, source: str) -> None:
    """YamlRefused when ``text`` would expand past ``MAX_NODES`` nodes or nest deeper than
    ``MAX_DEPTH``, or is not YAML at all."""
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, depth) of what it holds
    stack: list[list[Any]] = [[None, 0, 0]]  # [anchor, nodes, depth below] per open node
    total = 0

    def add(nodes: int, depth: int) -> None:
        nonlocal total
        total += nodes
        top = stack[-1]
        top[1] += nodes
        top[2] = max(top[2], depth)
        if total > MAX_NODES:
            raise YamlRefused(
                f"{source} expands to more than {MAX_NODES:,} nodes through YAML aliases "
                "(anchors nested in anchors, a 'billion laughs'); qpipe refuses it"
            )
        if len(stack) - 1 + depth > MAX_DEPTH:
            raise YamlRefused(
                f"{source} nests deeper than {MAX_DEPTH} levels; qpipe refuses it (a config "
                "nests a few)"
            )

    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.AliasEvent):
                nodes, depth = sizes.get(event.anchor, (1, 0))
                add(nodes, depth)
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor:
                    sizes[event.anchor] = (1, 0)
                add(1, 0)
            elif isinstance(event, yaml.CollectionStartEvent):
                stack.append([event.anchor, 1, 0])
                add(0, 0)
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, nodes, depth = stack.pop()
                if anchor:
                    sizes[anchor] = (nodes, depth + 1)
                stack[-1][1] += nodes
                stack[-1][2] = max(stack[-1][2], depth + 1)
    except yaml.YAMLError as err:  # libyaml's own limits too (nesting past 1000)
        where = " ".join(str(err).split())[:200]
        raise YamlRefused(f"{source} is not valid YAML ({where})") from None


def read_yaml_text(path: Path, what: str) -> str:
    """The text of a YAML file the user gave, checked (size, expansion, depth) and decoded."""
    path = require_file(path, what, "give a YAML file")
    data = read_bounded(path, MAX_BYTES, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what}: {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); give a UTF-8 YAML file"
        ) from None
    check_yaml_text(text, what if str(path) in what else f"{what}: {path}")
    return text


def safe_load(path: Path, what: str) -> Any:
    """``yaml.safe_load`` of a checked file; a syntax error is one line naming the file."""
    text = read_yaml_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
