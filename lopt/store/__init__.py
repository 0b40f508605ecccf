"""Persistence: the MLflow tracking and registry store (:mod:`lopt.store.registry`, the only
module of lopt that imports mlflow), the on-disk formats of models and optimizers
(:mod:`lopt.store.serialization`: JSON + msgpack, never pickles) and lineage hashes
(:mod:`lopt.store.lineage`)."""
