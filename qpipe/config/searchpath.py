"""The user's own configs: ``conf/`` of the working directory is searched before the built-in
``qpipe/conf``, so ``conf/model/my_model.yaml`` is ``model=my_model`` and a file there with a
built-in's name replaces it, without touching the installed package.

Every config file Hydra reads from a folder (``file://``: the user's ``conf/``,
``--config-dir``, ``hydra.searchpath``) is checked first (qpipe.config.yaml_limits): a file
that would expand past the limits is refused in one line before OmegaConf builds anything.
Hydra reports an error raised while it composes with a traceback, so the refusal leaves as
``ConfigRefusal`` (a SystemExit that ``python -m qpipe`` prints as one line)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra._internal.core_plugins.file_config_source import (
    FileConfigSource as _HydraFileConfigSource,
)
from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

from qpipe.config.compose import CONF_DIR
from qpipe.config.yaml_limits import read_yaml_text
from qpipe.errors import ConfigError, ConfigRefusal

log = logging.getLogger("qpipe")

PROVIDER = "qpipe-user"


def user_conf_dir() -> Path:
    return Path.cwd() / "conf"


class UserConfSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        user = user_conf_dir()
        if user.is_dir() and user.resolve() != CONF_DIR.resolve():
            search_path.prepend(PROVIDER, f"file://{user}", anchor=SearchPathQuery(provider="main"))


class FileConfigSource(_HydraFileConfigSource):
    """Hydra's folder config source, with every file checked before OmegaConf loads it.
    Hydra's own class name: its registry keeps one class per scheme and refuses a second
    name when a launcher's worker process (submitit, joblib) restores Hydra's state."""

    def load_config(self, config_path: str) -> ConfigResult:
        name = self._normalize_file_name(config_path)
        full = os.path.realpath(os.path.join(self.path, name))
        if os.path.exists(full):
            try:
                read_yaml_text(full, f"config {config_path}")
            except ConfigError as err:
                raise ConfigRefusal(str(err)) from None
        return super().load_config(config_path)


def register() -> None:
    """Make Hydra search the working directory's ``conf/`` first (before it composes), and
    check every config file it reads from a folder."""
    Plugins.instance().register(UserConfSearchPath)
    try:
        from hydra._internal.sources_registry import SourcesRegistry

        SourcesRegistry.instance().types["file"] = FileConfigSource
    except (ImportError, AttributeError) as err:  # another Hydra: its own loader, unchecked
        log.debug("config files are not checked before Hydra loads them: %s", err)
