"""Meta-training θ: the estimator interface and the meta-objective (:mod:`lopt.meta.estimator`),
the estimators that import only it (antithetic ES in :mod:`lopt.meta.es`, whole-unroll and
truncated backprop in :mod:`lopt.meta.tbptt`), the outer loop with the name → estimator
dictionary (:mod:`lopt.meta.loop`), and its checkpoints (:mod:`lopt.meta.checkpointing`).
Dependencies point one way: estimator ← es, tbptt ← loop."""
