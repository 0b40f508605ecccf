"""Fine-tuning unrolls: T optimizer steps of a classifier on one task, as one compiled call.

Everything an inner training run needs — pretraining, ES unrolls during meta-training, the
tuned baselines and the validation runs — goes through :func:`unroll`, so every optimizer is
measured by the same loop. Design:

* **One jitted call per run.** Steps run inside ``lax.scan`` (chunks of ``eval_every`` steps
  nested in an outer scan that evaluates after each chunk), so there is no per-step Python
  dispatch and no host sync. With im2col convolutions (``lopt.inner.models.PatchConv``) the scanned
  step is faster than a Python loop of jitted steps; with ``lax.conv`` it would be 3–6× slower.
* **Optimizers come from factories** ``make_optimizer(hparams, num_steps)`` whose ``hparams``
  (L3RS meta-parameters θ, or Adam's learning rate) are *traced* arguments: ES perturbations
  and learning-rate grids reuse one compilation.
* **Minibatches are drawn on device** from a key (uniform with replacement), so a run is a pure
  function of (hparams, initial params, data, key) and ± ES pairs can share their noise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.inner.models import ModelFn, Params

OptimizerFactory = Callable[[Any, int], optax.GradientTransformationExtraArgs]
"""``make_optimizer(hparams, num_steps) -> optimizer``; ``hparams`` may be traced."""

EvalParamsFn = Callable[[optax.OptState, Params], Params]
"""The parameters to evaluate, given the optimizer state (e.g. schedule-free's average)."""


class Split(NamedTuple):
    """Images float32 ``[N, H, W, C]`` in [0, 1] and integer labels ``[N]``, on device."""

    images: jax.Array
    labels: jax.Array


class Trajectory(NamedTuple):
    """What one unroll measured.

    Attributes:
      params: the parameters after the last step.
      train_loss: minibatch loss at every step ``[T]``.
      eval_steps: the steps at which the eval splits were measured ``[E + 1]`` (0 included).
      eval_loss: mean loss on each eval split at those steps ``[S, E + 1]``.
      eval_accuracy: accuracy on each eval split at those steps ``[S, E + 1]``.
      eval_example_loss: with ``per_example_loss``, every example's loss on each eval split
        at those steps, one ``[E + 1, N_split]`` array per split (splits differ in size), so
        that a comparison can be resampled over test examples as well as seeds.
    """

    params: Params
    train_loss: jax.Array
    eval_steps: jax.Array
    eval_loss: jax.Array
    eval_accuracy: jax.Array
    eval_example_loss: tuple[jax.Array, ...] | None = None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def evaluate(model_fn: ModelFn, params: Params, split: Split) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of ``params`` on a whole split (one batch)."""
    losses, accuracy = evaluate_examples(model_fn, params, split)
    return losses.mean(), accuracy


def evaluate_examples(model_fn: ModelFn, params: Params, split: Split) -> tuple[jax.Array, jax.Array]:
    """Every example's cross-entropy ``[N]`` and the accuracy of ``params`` on a split."""
    logits = model_fn(params, split.images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, split.labels)
    return losses, jnp.mean(jnp.argmax(logits, axis=-1) == split.labels)


TrainCarry = tuple[Params, optax.OptState]


def make_train_step(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformationExtraArgs,
    train: Split,
    batch_size: int,
) -> Callable[[TrainCarry, jax.Array], tuple[TrainCarry, jax.Array]]:
    """One optimizer step on a minibatch drawn from ``step_key``, in ``lax.scan`` form."""
    num_examples = train.labels.shape[0]

    def loss_fn(p, images, labels):
        return cross_entropy(model_fn(p, images), labels)

    def train_step(carry: TrainCarry, step_key: jax.Array) -> tuple[TrainCarry, jax.Array]:
        p, opt_state = carry
        idx = jax.random.randint(step_key, (batch_size,), 0, num_examples)
        loss, grads = jax.value_and_grad(loss_fn)(p, train.images[idx], train.labels[idx])
        updates, opt_state = optimizer.update(grads, opt_state, p, value=loss)
        return (optax.apply_updates(p, updates), opt_state), loss

    return train_step


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn", "make_optimizer", "num_steps", "batch_size", "eval_every", "eval_params",
        "per_example_loss",
    ),
)
def unroll(
    hparams: Any,
    params: Params,
    train: Split,
    eval_splits: tuple[Split, ...],
    key: jax.Array,
    *,
    model_fn: ModelFn,
    make_optimizer: OptimizerFactory,
    num_steps: int,
    batch_size: int,
    eval_every: int,
    eval_params: EvalParamsFn | None = None,
    per_example_loss: bool = False,
) -> Trajectory:
    """Trains ``params`` for ``num_steps`` steps with ``make_optimizer(hparams, num_steps)``.

    ``model_fn``, ``make_optimizer`` and ``eval_params`` are static: pass the same function
    objects (module level functions or cached closures) to reuse the compilation. The eval
    splits are measured at ``eval_params(opt_state, params)`` when it is given, and with
    ``per_example_loss`` every example's loss is kept too (``Trajectory.eval_example_loss``).
    """
    if num_steps % eval_every:
        raise ValueError(f"num_steps ({num_steps}) must be a multiple of eval_every ({eval_every}).")
    optimizer = make_optimizer(hparams, num_steps)
    train_step = make_train_step(model_fn, optimizer, train, batch_size)

    def measure(p):
        results = [evaluate_examples(model_fn, p, split) for split in eval_splits]
        means = jnp.stack([r[0].mean() for r in results]), jnp.stack([r[1] for r in results])
        return means, tuple(r[0] for r in results) if per_example_loss else None

    def chunk(carry, chunk_keys):
        carry, losses = jax.lax.scan(train_step, carry, chunk_keys)
        p, opt_state = carry
        return carry, (losses, measure(p if eval_params is None else eval_params(opt_state, p)))

    num_chunks = num_steps // eval_every
    keys = jax.random.split(key, num_steps)
    keys = keys.reshape(num_chunks, eval_every, *keys.shape[1:])
    (initial_loss, initial_accuracy), initial_examples = measure(params)
    (final_params, _), (losses, ((loss_curve, acc_curve), example_curves)) = jax.lax.scan(
        chunk, (params, optimizer.init(params)), keys
    )
    example_loss = None
    if per_example_loss:
        example_loss = tuple(
            jnp.concatenate([first[None], rest]) for first, rest in zip(initial_examples, example_curves)
        )
    return Trajectory(
        params=final_params,
        train_loss=losses.reshape(num_steps),
        eval_steps=jnp.arange(num_chunks + 1) * eval_every,
        eval_loss=jnp.concatenate([initial_loss[:, None], loss_curve.T], axis=1),
        eval_accuracy=jnp.concatenate([initial_accuracy[:, None], acc_curve.T], axis=1),
        eval_example_loss=example_loss,
    )


def default_eval_every(num_steps: int, num_points: int = 10) -> int:
    """The largest chunk ≤ ``num_steps / num_points`` that divides ``num_steps``."""
    target = max(1, num_steps // num_points)
    return next(k for k in range(target, 0, -1) if num_steps % k == 0)
