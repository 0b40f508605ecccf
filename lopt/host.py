"""Host settings for JAX on CPU, to apply before JAX creates its backend.

XLA reads ``XLA_FLAGS`` when the first computation creates the CPU client, not at
``import jax``; these functions must run before that.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    Kubernetes CPU limit), which affinity does not show: a pod limited to 4 CPUs on a 64-core
    node must not split its ES pairs 64 ways."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return count
    if quota == "max":
        return count
    return max(1, min(count, math.ceil(int(quota) / int(period))))


def use_all_cores() -> int:
    """One JAX CPU device per usable core (:func:`usable_cores`), so meta-training spreads its
    ES pairs over every core (:class:`lopt.meta.es.AntitheticES`); an ``XLA_FLAGS``
    that already sets the device count wins. Child processes (pipeline steps) inherit the
    setting. Returns the number of cores."""
    count = usable_cores()
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return count


def use_compilation_cache(directory: str | os.PathLike) -> None:
    """JAX's persistent compilation cache in ``directory``, for this process and the child
    processes (pipeline steps) it starts, unless ``JAX_COMPILATION_CACHE_DIR`` already names
    one. Every program is cached: the many sub-second compilations of small inner-training
    programs add up to most of a short run. JAX reads the environment at import, so a process
    that has imported it already gets the same settings through ``jax.config``."""
    settings = {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    for name, value in settings.items():
        os.environ.setdefault(name, value)
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs",
            float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
        )
