"""Shared settings of the components."""

from __future__ import annotations

import functools
import os

from kfp import dsl

# The image the steps run in on a cluster: it must have the project installed (and so kfp,
# which is why the components do not pip-install kfp at start). The local subprocess runner
# ignores it beyond requiring a "python" image name and runs the steps in the current venv.
BASE_IMAGE = os.environ.get("LOPT_COMPONENT_IMAGE", "python:3.11-slim")

component = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)
