"""ES population members spread over local devices give the same estimate as on one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from lopt import models
    from lopt.l3rs import L3RS, L3RSConfig, LayerLayout
    from lopt.meta_training import AntitheticES, FinalValidationLoss
    from lopt.tasks import TaskFamily, TaskFamilySpec

    spec = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)
    rng = np.random.default_rng(0)
    family = TaskFamily(
        TaskFamilySpec("synthetic", classes_per_task=3),
        train=jnp.asarray(rng.uniform(size=(4, 16, 8, 8, 1)), jnp.float32),
        val=jnp.asarray(rng.uniform(size=(4, 8, 8, 8, 1)), jnp.float32),
        content_hash="synthetic",
    )
    pretrained = models.init_params(spec, jax.random.key(0))
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(pretrained))
    es = AntitheticES(FinalValidationLoss(l3rs, spec, pretrained, family, 10, 8), num_pairs=4, sigma=0.1)
    estimate = es(l3rs.init(jax.random.key(1)), jax.random.key(2))
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(estimate.gradient)])
    np.save(sys.argv[1], flat)
    print(len(es.devices))
    """
)


def _estimate(tmp_path, devices: int) -> tuple[np.ndarray, int]:
    out = tmp_path / f"grad{devices}.npy"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True, check=True
    )
    return np.load(out), int(result.stdout.strip().splitlines()[-1])


def test_es_estimate_is_identical_on_one_and_two_devices(tmp_path):
    one, used_one = _estimate(tmp_path, 1)
    two, used_two = _estimate(tmp_path, 2)
    assert (used_one, used_two) == (1, 2)
    assert np.all(np.isfinite(one)) and np.any(one != 0)
    np.testing.assert_array_equal(one, two)
