"""Print the pins of manifests/image/constraints.txt from the current environment.

The constraints are the distributions that the project's runtime dependencies need,
transitively, at the versions installed in this environment: the image then installs the
set the test suite ran against. Test-only packages (pytest, kubernetes-validate, ...) stay out
because they are not reached from ``[project] dependencies``. Run from the repository root:

    .venv/bin/python manifests/image/freeze_constraints.py > manifests/image/constraints.txt
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Markers are evaluated for the image's platform, not this machine's.
IMAGE_ENVIRONMENT = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
                     "os_name": "posix", "python_version": "3.11"}

HEADER = """\
# Every distribution that the project's runtime dependencies need, transitively, pinned to
# the version installed where the tests ran; both images install with it (pip --constraint).
# Generated, do not edit: .venv/bin/python manifests/image/freeze_constraints.py > manifests/image/constraints.txt
"""


def applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**IMAGE_ENVIRONMENT, "extra": extra})
               for extra in extras | {""})


def closure(roots: list[Requirement]) -> dict[str, str]:
    """Installed name -> version of every distribution the roots need."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(root, set(root.extras)) for root in roots if applies(root, set())]
    while pending:
        requirement, extras = pending.pop()
        key = (canonicalize_name(requirement.name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(requirement.name)
        pins[dist.metadata["Name"]] = dist.version
        for line in dist.requires or []:
            child = Requirement(line)
            if applies(child, extras):
                pending.append((child, set(child.extras)))
    return pins


def main() -> None:
    pyproject = tomllib.loads(Path("pyproject.toml").read_text())
    roots = [Requirement(line) for line in pyproject["project"]["dependencies"]]
    pins = closure(roots)
    sys.stdout.write(HEADER)
    for name in sorted(pins, key=canonicalize_name):
        sys.stdout.write(f"{name}=={pins[name]}\n")


if __name__ == "__main__":
    main()
