"""Prepares MLflow's basic-auth app before the tracking server starts.

The init container `auth-setup` of Deployment/mlflow (mlflow.yaml) runs this with the server
image's Python; kustomize ships it as the ConfigMap `mlflow-auth-setup` (kustomization.yaml).
It does three things, every time the pod starts, so that a fresh install works and a restart
applies changed Secrets:

1. Writes MLflow's auth config file (``MLFLOW_AUTH_CONFIG_PATH``, on a memory-backed volume
   the server container mounts read-only). MLflow reads the auth database's URI only from that
   file, and the URI carries PostgreSQL's password, so the file is written here from the
   environment instead of shipped in a ConfigMap. The auth tables share the tracking store's
   database: their names do not overlap with the tracking store's, and their migrations keep
   their own version table (``alembic_version_auth``), so one backup holds both.
2. Creates or migrates the auth tables.
3. Makes the admin user and the pipeline's user match their Secrets: created when missing,
   the password reset when it differs, the admin flag set (admin) or cleared (pipeline). The
   Secrets are the source of truth: a password changed through MLflow's API or UI is reset to
   the Secret's at the next start (manifests/README.md, "Authentication").

Environment (mlflow.yaml sets each one):
  MLFLOW_AUTH_CONFIG_PATH          the config file to write
  MLFLOW_BACKEND_STORE_URI         the tracking store's database, which the auth tables join
  MLFLOW_AUTH_DEFAULT_PERMISSION   what every signed-in user may do where nothing else is
                                   granted: READ, USE, EDIT, MANAGE or NO_PERMISSIONS
  MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   Secret `mlflow-auth`
  LOPT_PIPELINE_USERNAME, LOPT_PIPELINE_PASSWORD           Secret `mlflow-credentials`

Exit status: 0 done; 2 a setting is missing or unusable (one line on stderr names it; the pod
stays in Init:CrashLoopBackOff until the Secret is fixed); 1 anything else, such as the
database not answering yet (the kubelet restarts the container with a back-off).
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Mapping

PROGRAM = "mlflow-auth-setup"
EXIT_BAD_INPUT = 2
# MLflow's permission names (mlflow/server/auth/permissions.py).
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
# MLflow refuses shorter passwords (mlflow.utils.validation._validate_password).
MIN_PASSWORD_LENGTH = 12
PLACEHOLDER_PREFIX = "REPLACE-"  # what the templates in manifests/secrets/ hold


class SetupError(ValueError):
    """A setting is missing or unusable; the message names it and says what to do."""


@dataclasses.dataclass(frozen=True)
class Settings:
    config_path: Path
    database_uri: str
    default_permission: str
    admin_username: str
    admin_password: str
    pipeline_username: str
    pipeline_password: str


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value.strip():
        raise SetupError(f"{name} is not set or empty: set it (manifests/README.md, Authentication).")
    if value.startswith(PLACEHOLDER_PREFIX):
        raise SetupError(
            f"{name} is still the template's placeholder {value!r}: create the Secret with a real "
            "value (manifests/README.md, Authentication)."
        )
    if any(c in value for c in "\r\n"):
        raise SetupError(f"{name} contains a line break: remove it (a trailing newline of a file?).")
    return value


def _password(env: Mapping[str, str], name: str) -> str:
    value = _required(env, name)
    if len(value) < MIN_PASSWORD_LENGTH:
        raise SetupError(
            f"{name} has {len(value)} characters; MLflow needs at least {MIN_PASSWORD_LENGTH} "
            "(e.g. openssl rand -hex 24)."
        )
    return value


def read_settings(env: Mapping[str, str]) -> Settings:
    """All settings, checked before anything is written or connected to."""
    permission = env.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "")
    if permission not in PERMISSIONS:
        raise SetupError(
            f"MLFLOW_AUTH_DEFAULT_PERMISSION is {permission!r}; use one of {', '.join(PERMISSIONS)}."
        )
    settings = Settings(
        config_path=Path(_required(env, "MLFLOW_AUTH_CONFIG_PATH")),
        database_uri=_required(env, "MLFLOW_BACKEND_STORE_URI"),
        default_permission=permission,
        admin_username=_required(env, "MLFLOW_AUTH_ADMIN_USERNAME"),
        admin_password=_password(env, "MLFLOW_AUTH_ADMIN_PASSWORD"),
        pipeline_username=_required(env, "LOPT_PIPELINE_USERNAME"),
        pipeline_password=_password(env, "LOPT_PIPELINE_PASSWORD"),
    )
    if settings.admin_username == settings.pipeline_username:
        raise SetupError(
            f"The admin and the pipeline's user are both {settings.admin_username!r}: the pipeline "
            "runs as a user of its own without admin rights; give it another name."
        )
    return settings


def config_text(settings: Settings) -> str:
    """The config file's text. MLflow reads it with configparser's default interpolation, in
    which '%' starts a reference, so a literal one is written as '%%'."""
    values = {
        "default_permission": settings.default_permission,
        "database_uri": settings.database_uri,
        "admin_username": settings.admin_username,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
    }
    lines = ["[mlflow]"] + [f"{key} = {value.replace('%', '%%')}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_config(settings: Settings) -> None:
    """Writes the config file atomically, readable by this user only, and reads it back the
    way MLflow does to make sure the URI survived."""
    path = settings.config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(config_text(settings))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    parser = configparser.ConfigParser()
    parser.read(path)
    if parser["mlflow"]["database_uri"] != settings.database_uri:
        raise SetupError(f"{path}: database_uri does not read back as written.")


def _ensure_user(store, username: str, password: str, is_admin: bool) -> str:
    """Makes one user match its Secret; returns what was done, without the password."""
    if not store.has_user(username, use_primary=True):
        store.create_user(username, password, is_admin=is_admin)
        return "created"
    done = []
    if not store.authenticate_user(username, password, use_primary=True):
        store.update_user(username, password=password)
        done.append("password reset to the Secret's")
    if store.get_user(username).is_admin != is_admin:
        store.update_user(username, is_admin=is_admin)
        done.append("made admin" if is_admin else "admin rights removed")
    return ", ".join(done) or "unchanged"


def sync_users(settings: Settings) -> list[str]:
    """Migrates the auth tables and makes both users match their Secrets."""
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(settings.config_path)
    # Imported only now: the module reads the config file when it is imported.
    from mlflow.server.auth import auth_config, store

    store.init_db(auth_config.database_uri)
    return [
        f"admin user {settings.admin_username!r}: "
        + _ensure_user(store, settings.admin_username, settings.admin_password, is_admin=True),
        f"pipeline user {settings.pipeline_username!r}: "
        + _ensure_user(store, settings.pipeline_username, settings.pipeline_password, is_admin=False),
    ]


def main(env: Mapping[str, str] = os.environ) -> int:
    try:
        settings = read_settings(env)
        write_config(settings)
        report = sync_users(settings)
    except SetupError as err:
        print(f"{PROGRAM}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{PROGRAM}: wrote {settings.config_path} (default permission {settings.default_permission})")
    for line in report:
        print(f"{PROGRAM}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
