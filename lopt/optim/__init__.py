"""The optimizers: L3RS, the learned rule (:mod:`lopt.optim.l3rs`, an optax
``GradientTransformationExtraArgs`` factory from θ), the layer layout it reads a params tree by
(:mod:`lopt.optim.layout`), and the hand-designed baselines it is measured against
(:mod:`lopt.optim.baselines`). Pure JAX and optax: nothing here knows about tasks, MLflow or
meta-training."""
