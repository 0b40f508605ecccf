"""Credentials out of everything lopt prints, logs or raises.

A tracking URI may carry a password (``http://user:secret@mlflow:5000``,
``postgresql://user:secret@db/mlflow``). :func:`redact` is the one function every print, log and
error path of lopt passes such text through; it works on any text (a URI, an error message, a
traceback), so a message that merely *contains* a URI is covered too. It has no dependencies, so
the command line can use it without importing MLflow.

:func:`split_credentials` takes the user name and password out of an HTTP(S) URI, so that the
command line can hand them to MLflow (and to the pipeline's steps, which inherit the
environment) as ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` — the variables a
cluster fills from the ``mlflow-credentials`` Secret — and pass the URI on without them: the
Kubeflow executor logs every step's parameters, and a cluster stores them with the run.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["REDACTED", "redact", "split_credentials"]

REDACTED = "***"

# scheme://user:password@ — the password is everything up to the last "@" before the path (an
# unencoded "@" in a password is taken as part of it, as urllib does), so none of it survives.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/@:]*):([^\s/]*)@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` replaced by ``***``.

    The user name stays (it says which account was used); a URI without a password is
    returned unchanged.
    """
    return _USERINFO.sub(lambda m: f"{m[1]}{m[2]}:{REDACTED}@", str(text))


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """For an ``http(s)://user:password@host`` URI: the URI without them, and MLflow's
    environment variables that carry them instead. Any other URI comes back unchanged, with
    no variables (a database URI has no other place for its password)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in {"http", "https"} or parts.password is None:
        return uri, {}
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    clean = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return clean, {
        "MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(parts.username or ""),
        "MLFLOW_TRACKING_PASSWORD": urllib.parse.unquote(parts.password),
    }
