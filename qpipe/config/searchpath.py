"""The user's own configs: ``conf/`` of the working directory is searched before the built-in
``qpipe/conf``, so ``conf/model/my_model.yaml`` is ``model=my_model`` and a file there with a
built-in's name replaces it, without touching the installed package."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from qpipe.config.compose import CONF_DIR

PROVIDER = "qpipe-user"


def user_conf_dir() -> Path:
    return Path.cwd() / "conf"


class UserConfSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        user = user_conf_dir()
        if user.is_dir() and user.resolve() != CONF_DIR.resolve():
            search_path.prepend(PROVIDER, f"file://{user}", anchor=SearchPathQuery(provider="main"))


def register() -> None:
    """Make Hydra search the working directory's ``conf/`` first (before it composes)."""
    Plugins.instance().register(UserConfSearchPath)
