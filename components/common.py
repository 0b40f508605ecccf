"""Shared settings of the components."""

from __future__ import annotations

import functools

from kfp import dsl

# The image of the lightweight steps. The local subprocess runner ignores it beyond requiring a
# "python" image name and runs the steps in the current venv; a cluster build replaces it with
# the project's image (pipeline.pipeline.ClusterTarget), which has the project and so kfp
# installed: that is why the components do not pip-install kfp at start.
BASE_IMAGE = "python:3.11-slim"

component = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)
