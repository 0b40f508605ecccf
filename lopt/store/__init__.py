"""Persistence: the MLflow tracking and registry store (:mod:`lopt.store.registry`, the one
namespace, re-exporting :mod:`~lopt.store.tracking`, :mod:`~lopt.store.models` and
:mod:`~lopt.store.locks`, the only modules of lopt that import mlflow), the on-disk formats of
models and optimizers (:mod:`lopt.store.serialization`: JSON + msgpack, never pickles) and
lineage hashes (:mod:`lopt.store.lineage`)."""
