"""A downstream fine-tuning job: the registered base model, the registered optimizer, optax.

This is the code a team copies into its own fine-tuning job. It uses only the public contract
(:func:`lopt.load_pretrained`, :func:`lopt.fetch_optimizer`) and a plain optax training loop
of jitted steps, the way any optax user trains::

    model_fn, params, info = lopt.load_pretrained("models:/cnn-mnist@champion", num_classes=k)
    opt = lopt.fetch_optimizer("models:/l3rs-cnn-mnist@champion", num_steps=T)
    state = opt.init(params)
    for step in range(T):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, value=loss)   # L3RS needs the loss
        params = optax.apply_updates(params, updates)
    eval_at = lopt.eval_params(state, params)   # for a measurement before the last step

A run of the planned ``T`` steps ends on the parameters to keep. When the optimizer averages
its iterates (schedule-free style), the parameters it takes gradients at lie between a fast
iterate and its average, so a measurement in the middle of the run evaluates
:func:`lopt.eval_params` (as with ``optax.contrib.schedule_free_eval_params``).

:func:`finetune_loop` adds evaluation every few steps (validation and test loss and accuracy) and
returns the curves; ``lopt finetune`` logs them to MLflow and, with ``--compare adam``, runs
Adam with its learning rate tuned on the validation split over the same grid the validation
suite uses, on the same head and minibatches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.inner.models import ModelFn, Params
from lopt.inner.tasks import Task
from lopt.inner.training import EvalParamsFn, cross_entropy, evaluate


@dataclasses.dataclass(frozen=True)
class Curve:
    """Losses and accuracies measured during one fine-tuning run."""

    name: str
    steps: tuple[int, ...]
    val_loss: tuple[float, ...]
    test_loss: tuple[float, ...]
    test_accuracy: tuple[float, ...]
    learning_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def finetune_loop(
    model_fn: ModelFn,
    params: Params,
    optimizer: optax.GradientTransformationExtraArgs,
    task: Task,
    num_steps: int,
    *,
    batch_size: int = 64,
    seed: int = 0,
    eval_every: int | None = None,
    name: str = "optimizer",
    eval_params: EvalParamsFn | None = None,
) -> tuple[Params, Curve]:
    """Fine-tunes ``params`` on ``task`` for ``num_steps`` minibatch steps of ``optimizer``, one
    jitted step at a time as a downstream job does (validation measures with the single jitted
    unroll of :func:`lopt.eval.evaluation.measured_unroll` instead); measurements evaluate
    ``eval_params(state, params)`` when given (e.g. :func:`lopt.eval_params`)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    eval_every = eval_every or max(1, num_steps // 10)
    train = task.train

    def loss_fn(p, images, labels):
        return cross_entropy(model_fn(p, images), labels)

    measure_split = jax.jit(lambda p, split: evaluate(model_fn, p, split))

    @jax.jit
    def step(p, state, key):
        index = jax.random.randint(key, (batch_size,), 0, train.labels.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, train.images[index], train.labels[index])
        updates, state = optimizer.update(grads, state, p, value=loss)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    keys = jax.random.split(jax.random.key(seed), num_steps)
    steps, val_loss, test_loss, test_acc = [], [], [], []

    def measure(at: int) -> None:
        steps.append(at)
        evaluated = params if eval_params is None else eval_params(state, params)
        val_loss.append(float(measure_split(evaluated, task.val)[0]))
        loss, acc = measure_split(evaluated, task.test)
        test_loss.append(float(loss))
        test_acc.append(float(acc))

    measure(0)
    for t in range(num_steps):
        params, state = step(params, state, keys[t])
        if (t + 1) % eval_every == 0 or t + 1 == num_steps:
            measure(t + 1)
    return params, Curve(name, tuple(steps), tuple(val_loss), tuple(test_loss), tuple(test_acc))


def tuned_adam(
    model_fn: ModelFn,
    params: Params,
    task: Task,
    num_steps: int,
    learning_rates: Sequence[float],
    *,
    batch_size: int = 64,
    seed: int = 0,
) -> Curve:
    """Adam at each learning rate; the run with the lowest final validation loss."""
    curves = []
    for lr in learning_rates:
        _, curve = finetune_loop(
            model_fn, params, optax.with_extra_args_support(optax.adam(lr)), task, num_steps, batch_size=batch_size, seed=seed,
            name="adam",
        )
        curves.append(dataclasses.replace(curve, learning_rate=float(lr)))
    finite = [c for c in curves if np.isfinite(c.val_loss[-1])]
    if not finite:
        raise RuntimeError("Adam diverged at every learning rate of the grid.")
    return min(finite, key=lambda c: c.val_loss[-1])
