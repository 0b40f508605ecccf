"""The inner problem: the pretrained model (:mod:`lopt.inner.models`), fine-tuning tasks and
task families drawn from the datasets of :mod:`lopt.data` (:mod:`lopt.inner.tasks`,
:mod:`lopt.inner.task_augmentation`), and the jitted fine-tuning unroll every optimizer runs
through (:mod:`lopt.inner.training`)."""
