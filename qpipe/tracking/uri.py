"""Is the MLflow tracking server there? Asked once, in seconds, before any run opens.

MLflow's client retries an unreachable server for minutes and then fails with a traceback; a
plain HTTP probe with a short timeout answers the same question at once. ``mlflow.fallback``
says what to do about it: ``null`` stops with one line naming the URI, ``local`` logs to the
local store instead and says so.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from qpipe.errors import ConfigError, QpipeError
from qpipe.tracking.runs import STORE_HINT, default_tracking_uri

log = logging.getLogger("qpipe")

FALLBACKS = (None, "local")
# The tracking stores MLflow opens (its registry's schemes; mysql+pymysql:// and the like too).
SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "uc")
PROBE_TIMEOUT_S = 3.0


class TrackingUnavailable(QpipeError):
    """The configured tracking server does not answer."""


def unreachable_reason(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the server at ``uri`` cannot be reached (None when it answers, or when the URI is a
    local store that needs no server). An MLflow server answers ``/health`` with 200 (401/403
    behind authentication: up, the credentials are another matter); anything else that answers
    HTTP there — a proxy, another web server — is not the tracking server."""
    if not uri.startswith(("http://", "https://")):
        return None
    start = time.perf_counter()
    # No proxy: a tracking server on localhost or the LAN must not be sent to a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return None
        return f"HTTP {err.code} from {uri}/health: not an MLflow tracking server"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"{reason} after {time.perf_counter() - start:.1f} s"


def resolve_tracking_uri(mlflow_cfg: Mapping[str, Any]) -> str:
    """The tracking URI to log to: the configured one when it answers (or is local), the local
    store when it does not and ``mlflow.fallback=local``; otherwise TrackingUnavailable."""
    fallback = mlflow_cfg.get("fallback")
    if fallback not in FALLBACKS:
        raise ConfigError(f"mlflow.fallback={fallback!r} is not valid; use null or local")
    uri = mlflow_cfg.get("tracking_uri") or default_tracking_uri()
    scheme = urllib.parse.urlsplit(str(uri)).scheme
    if len(scheme) > 1 and scheme.split("+")[0] not in SCHEMES:  # (one letter: a Windows drive)
        raise ConfigError(
            f"mlflow.tracking_uri={uri!r}: MLflow has no tracking store for {scheme}://; "
            f"{STORE_HINT}"
        )
    reason = unreachable_reason(uri)
    if reason is None:
        return uri
    if fallback == "local":
        local = default_tracking_uri()
        log.warning(
            "MLflow server %s is unreachable (%s): logging to %s instead (mlflow.fallback=local)",
            uri,
            reason,
            local,
        )
        return local
    raise TrackingUnavailable(
        f"mlflow.tracking_uri={uri} is unreachable ({reason}); start the server, fix the URI, "
        "or set mlflow.fallback=local to log to the local store"
    )
