"""Host settings for JAX on CPU, to apply before JAX creates its backend.

XLA reads ``XLA_FLAGS`` when the first computation creates the CPU client, not at
``import jax``; these functions must run before that.
"""

from __future__ import annotations

import os


def use_all_cores() -> int:
    """One JAX CPU device per usable core, so meta-training spreads its ES pairs over every
    core (:class:`lopt.meta_training.AntitheticES`); an ``XLA_FLAGS`` that already sets the
    device count wins. Child processes (pipeline steps) inherit the setting. Returns the
    number of cores."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return count
