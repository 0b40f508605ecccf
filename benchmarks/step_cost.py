"""Step cost of L3RS relative to Adam: time of one jitted training step, and state bytes.

Goals (issue #3): an L3RS training step costs at most 1.15× an ``optax.adam`` step, and the
L3RS optimizer state takes at most 1.5× Adam's bytes. Both are ratios, measured here side by
side in one process on the same model, batch and seeds, because absolute times on a small
shared CPU machine drift from run to run while ratios of interleaved measurements do not.

Two regimes are timed, since they stress different overheads:

* ``python loop``: one jitted step per Python call (params and optimizer state donated), N calls,
  ``block_until_ready`` only at the end — how a downstream fine-tuning job runs.
* ``scan``: N steps inside one jitted ``lax.scan``, each on a minibatch gathered on device —
  how ``lopt.inner.training.unroll`` runs inner training during meta-training and validation.

N is chosen per model and batch size so that one measurement takes about ``--target-ms`` of
Adam's time. Each round times every (regime, optimizer) once, optimizers in rotated order, so
slow phases of the machine hit all of them alike; the table reports the median over rounds of
each optimizer's per-step time and the ratio of the medians, and as a cross-check the median of
the per-round ratios. Every per-round number and compile time goes to the JSON file.

    .venv/bin/python benchmarks/step_cost.py                 # both models, batch 64 and 128
    .venv/bin/python benchmarks/step_cost.py --models base --batch-sizes 64 --rounds 15 --ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from lopt.inner import models
from lopt.config import get_config
from lopt.optim.l3rs import L3RS
from lopt.optim.layout import LayerLayout
from lopt.inner.training import cross_entropy

MODELS: dict[str, models.ModelSpec] = {
    # The default base model: the 38k-parameter CNN on 14×14×1 inputs.
    "base": models.ModelSpec(num_classes=5),
    # A larger CNN on 28×28 inputs (~420k parameters) to show how the ratio scales.
    "large": models.ModelSpec(
        num_classes=10, input_shape=(28, 28, 1), conv_features=(32, 64), hidden_size=128
    ),
}

REGIMES = ("python loop", "scan")
ABLATION_DIRECTIONS = ("adam", "momentum", "gradient")
STEP_TIME_GOAL = 1.15
STATE_BYTES_GOAL = 1.5
DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parent / "results" / "step_cost.json"


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One optimizer under test: its name, the transformation, and whether it takes the loss."""

    name: str
    tx: optax.GradientTransformation
    takes_value: bool


def make_optimizers(
    params: Any, horizon: int, ablation: bool, control_intervals: tuple[int, ...] = (),
    schedule_free: bool = False,
) -> list[Optimizer]:
    def l3rs(**overrides: Any) -> optax.GradientTransformationExtraArgs:
        # The architecture the pipeline meta-trains (its normalization and step size).
        config = dataclasses.replace(get_config("default").meta_train.l3rs, **overrides)
        method = L3RS(config, LayerLayout.from_params(params))
        return method.opt_fn(method.init(jax.random.key(1, impl="rbg")), num_steps=horizon)

    optimizers = [
        Optimizer("adam", optax.adam(1e-3), takes_value=False),
        Optimizer("l3rs", l3rs(), takes_value=True),
    ]
    if ablation:
        optimizers.append(Optimizer("l3rs_3dir", l3rs(directions=ABLATION_DIRECTIONS), takes_value=True))
    for interval in control_intervals:
        optimizers.append(
            Optimizer(f"l3rs_every{interval}", l3rs(control_interval=interval), takes_value=True)
        )
    if schedule_free:
        # The averaging option keeps the fast iterate z: one more copy of the parameters.
        optimizers.append(
            Optimizer("l3rs_schedule_free", l3rs(averaging="schedule_free"), takes_value=True)
        )
    return optimizers


def make_train_step(spec: models.ModelSpec, opt: Optimizer) -> Callable:
    """``(params, opt_state, images, labels) -> (params, opt_state, loss)``, not yet jitted."""
    apply = models.model_fn(spec)

    def loss_fn(params, images, labels):
        return cross_entropy(apply(params, images), labels)

    def train_step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        if opt.takes_value:
            updates, opt_state = opt.tx.update(grads, opt_state, params, value=loss)
        else:
            updates, opt_state = opt.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def jit_runner(spec: models.ModelSpec, opt: Optimizer, regime: str) -> Callable:
    """``(params, opt_state, *inputs) -> (params, opt_state)``, jitted.

    python loop: one step on the batch ``(images, labels)``. scan: one step per row of
    ``indices`` ``[K, B]``, each on the minibatch gathered from ``(images, labels)`` as
    ``lopt.inner.training.unroll`` does, so no work is loop-invariant for XLA to hoist out of the scan.
    """
    train_step = make_train_step(spec, opt)

    def one_step(params, opt_state, images, labels):
        return train_step(params, opt_state, images, labels)[:2]

    def scanned(params, opt_state, images, labels, indices):
        def body(carry, idx):
            return one_step(*carry, images[idx], labels[idx]), None

        return jax.lax.scan(body, (params, opt_state), indices)[0]

    # Params and state are donated: the step updates them in place, as a real training loop would.
    return jax.jit(one_step if regime == "python loop" else scanned, donate_argnums=(0, 1))


def state_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tx.init(params)))


def time_regime(runner: Callable, carry: tuple, inputs: tuple, calls: int) -> tuple[tuple, float]:
    """Runs ``calls`` calls back to back, syncing once at the end; returns new carry and seconds."""
    start = time.perf_counter()
    for _ in range(calls):
        carry = runner(*carry, *inputs)
    jax.block_until_ready(carry)
    return carry, time.perf_counter() - start


def init_params(spec: models.ModelSpec, seed: int) -> Any:
    """The model's own initialization, jitted and with the ``rbg`` PRNG: eager Flax init and
    threefry take seconds to compile here, which would dominate a short benchmark."""
    return jax.jit(models.init_params, static_argnums=0)(spec, jax.random.key(seed, impl="rbg"))


def bench_config(
    model_name: str, params: Any, batch_size: int, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measures every regime and optimizer for one (model, batch size).

    Returns the table rows and the raw data (every per-round time, compile times, state bytes).
    """
    spec = MODELS[model_name]
    rng = np.random.default_rng(args.seed)
    # A pool of examples: the python loop steps on its first batch, the scan regime on
    # minibatches drawn from all of it.
    pool_size = 4 * batch_size
    pool = (
        jnp.asarray(rng.uniform(size=(pool_size, *spec.input_shape)), jnp.float32),
        jnp.asarray(rng.integers(0, spec.num_classes, size=pool_size), jnp.int32),
    )
    inputs = {"python loop": (pool[0][:batch_size], pool[1][:batch_size])}
    optimizers = make_optimizers(
        params, args.horizon, args.ablation, tuple(args.control_intervals), args.schedule_free
    )
    runners, carries, compile_s, nbytes = {}, {}, {}, {}

    def prepare(opt: Optimizer, regime: str) -> float:
        """Compiles and warms up one (optimizer, regime); returns the warm-up's seconds per step."""
        key = (opt.name, regime)
        runners[key] = jit_runner(spec, opt, regime)
        # Each (optimizer, regime) trains its own copy: donation consumes the buffers.
        carry = (jax.tree.map(jnp.copy, params), opt.tx.init(params))
        start = time.perf_counter()
        carry = jax.block_until_ready(runners[key](*carry, *inputs[regime]))  # compile + 1st call
        compile_s[key] = time.perf_counter() - start
        warm_calls = 5 if regime == "python loop" else 1
        carries[key], seconds = time_regime(runners[key], carry, inputs[regime], warm_calls)
        return seconds / (warm_calls * steps_per_call[regime])

    # Steps per measurement: as many as fill about --target-ms of Adam's time (warm-up estimate),
    # so small and large models are measured for similar, noise-averaging durations. The python
    # loop makes `steps` calls of one step; the scan regime one call of `steps` steps.
    steps_per_call = {"python loop": 1}
    adam_step_s = prepare(optimizers[0], "python loop")
    steps = args.steps or min(max(round(args.target_ms / 1e3 / adam_step_s), 3), 200)
    steps_per_call["scan"] = steps
    calls = {"python loop": steps, "scan": 1}
    indices = rng.integers(0, pool_size, size=(steps, batch_size))
    inputs["scan"] = (*pool, jnp.asarray(indices, jnp.int32))
    for opt in optimizers:
        nbytes[opt.name] = state_bytes(opt.tx, params)
        for regime in REGIMES:
            if (opt.name, regime) not in runners:
                prepare(opt, regime)

    per_round = {key: [] for key in carries}  # seconds per step, one per round
    names = [opt.name for opt in optimizers]
    # No garbage collection inside a measurement; one collection here is enough for these rounds
    # (a collection per measurement would cost more than the measurements).
    gc.collect()
    gc.disable()
    try:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for regime in REGIMES:
                for name in order:
                    key = (name, regime)
                    carries[key], seconds = time_regime(
                        runners[key], carries[key], inputs[regime], calls[regime]
                    )
                    per_round[key].append(seconds / (calls[regime] * steps_per_call[regime]))
    finally:
        gc.enable()

    num_params = models.num_parameters(params)
    rows, raw = [], []
    for regime in REGIMES:
        adam_ms = 1e3 * statistics.median(per_round[("adam", regime)])
        for name in names[1:]:
            ms = 1e3 * statistics.median(per_round[(name, regime)])
            paired = [
                b / a for a, b in zip(per_round[("adam", regime)], per_round[(name, regime)])
            ]
            rows.append(
                {
                    "model": model_name,
                    "params": num_params,
                    "batch": batch_size,
                    "regime": regime,
                    "optimizer": name,
                    "adam_ms_per_step": adam_ms,
                    "l3rs_ms_per_step": ms,
                    "step_time_ratio": ms / adam_ms,
                    # The median of per-round ratios: a cross-check robust to slow drift.
                    "median_paired_ratio": statistics.median(paired),
                    # Noise only adds time, so the fastest rounds are a second cross-check.
                    "ratio_of_minimums": min(per_round[(name, regime)])
                    / min(per_round[("adam", regime)]),
                    "state_bytes_ratio": nbytes[name] / nbytes["adam"],
                }
            )
    for (name, regime), seconds in per_round.items():
        raw.append(
            {
                "model": model_name,
                "batch": batch_size,
                "regime": regime,
                "optimizer": name,
                "steps_per_round": calls[regime] * steps_per_call[regime],
                "compile_and_first_call_s": compile_s[(name, regime)],
                "seconds_per_step_per_round": seconds,
            }
        )
    return rows, {"model_spec": spec.to_json(), "num_params": num_params,
                  "steps_per_measurement": steps, "state_bytes": nbytes, "measurements": raw}


def environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device": f"{device.platform}:{device.device_kind}",
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "params", "batch", "regime", "optimizer", "adam ms/step", "l3rs ms/step",
              "ratio", "paired ratio", "state bytes ratio")
    lines = [
        (r["model"], f"{r['params']:,}", str(r["batch"]), r["regime"], r["optimizer"],
         f"{r['adam_ms_per_step']:.3f}", f"{r['l3rs_ms_per_step']:.3f}",
         f"{r['step_time_ratio']:.3f}", f"{r['median_paired_ratio']:.3f}",
         f"{r['state_bytes_ratio']:.4f}")
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in (1, 2) or i >= 5 else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["base", "large"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--rounds", type=int, default=15,
                        help="interleaved rounds; the table reports medians over them")
    parser.add_argument("--target-ms", type=float, default=50.0,
                        help="aim of each measurement's duration, sets the steps per measurement")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per measurement (jitted calls in the python loop, scan "
                        "length in the scan regime); overrides --target-ms")
    parser.add_argument("--horizon", type=int, default=1000, help="L3RS num_steps (T)")
    parser.add_argument("--ablation", action="store_true",
                        help="also time L3RS with only the directions adam, momentum, gradient "
                        "(two more compilations per model and batch size)")
    parser.add_argument("--control-intervals", nargs="*", type=int, default=[],
                        help="also time L3RS refreshing its controller every N steps "
                        "(L3RSConfig.control_interval), one variant per N")
    parser.add_argument("--schedule-free", action="store_true",
                        help="also time L3RS with schedule-free averaging")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial parameters and the data")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    rows, configs = [], []
    for model_name in args.models:
        params = init_params(MODELS[model_name], args.seed)
        for batch_size in args.batch_sizes:
            config_rows, config_raw = bench_config(model_name, params, batch_size, args)
            rows += config_rows
            configs.append({"model": model_name, "batch": batch_size, **config_raw})
            print(f"measured {model_name} batch {batch_size} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    print(format_table(rows))
    print(f"\ngoals: step time ratio <= {STEP_TIME_GOAL}, state bytes ratio <= {STATE_BYTES_GOAL}; "
          f"ratio = median l3rs / median adam over {args.rounds} interleaved rounds")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "step_cost",
        "environment": environment(),
        "settings": {**vars(args), "output": str(args.output)},
        "goals": {"step_time_ratio": STEP_TIME_GOAL, "state_bytes_ratio": STATE_BYTES_GOAL},
        "rows": rows,
        "configs": configs,
        "wall_s": time.perf_counter() - started,
    }
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
