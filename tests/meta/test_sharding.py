"""ES population members spread over local devices give the same estimates, and so the same
meta-trained θ, as on one device."""

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
    from lopt.inner import models
    from lopt.optim.l3rs import L3RS, L3RSConfig
    from lopt.optim.layout import LayerLayout
    from lopt.meta.es import AntitheticES
    from lopt.meta.estimator import FinalValidationLoss, sample_devices
    from lopt.meta.loop import meta_train
    from lopt.inner.tasks import TaskFamily, TaskFamilySpec

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
    result = meta_train(es, l3rs.init(jax.random.key(1)), num_steps=2, learning_rate=0.01,
                        key=jax.random.key(3), progress=False)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    np.save(sys.argv[1], np.stack([flat(estimate.gradient), flat(result.theta)]))
    print(len(sample_devices(es.num_pairs)))
    """
)


def _estimate(tmp_path, devices: int) -> tuple[np.ndarray, int]:
    out = tmp_path / f"grad{devices}.npy"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True, check=True
    )
    return np.load(out), int(result.stdout.strip().splitlines()[-1])


def _initial_theta() -> np.ndarray:
    import jax

    from lopt.inner import models
    from lopt.optim.l3rs import L3RS, L3RSConfig
    from lopt.optim.layout import LayerLayout

    spec = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)
    layout = LayerLayout.from_params(models.init_params(spec, jax.random.key(0)))
    theta = L3RS(L3RSConfig(), layout).init(jax.random.key(1))
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(theta)])


def test_es_estimate_and_meta_trained_theta_are_identical_on_one_and_two_devices(tmp_path):
    one, used_one = _estimate(tmp_path, 1)
    two, used_two = _estimate(tmp_path, 2)
    assert (used_one, used_two) == (1, 2)
    (gradient, theta), (gradient_two, theta_two) = one, two
    assert np.all(np.isfinite(gradient)) and np.any(gradient != 0)
    np.testing.assert_array_equal(gradient, gradient_two)
    # Two meta-steps from the same start: bitwise the same θ.
    np.testing.assert_array_equal(theta, theta_two)
    assert np.any(theta != _initial_theta())
