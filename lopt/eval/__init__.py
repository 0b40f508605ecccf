"""Measuring optimizers: tuned baselines and L3RS on held-out tasks (:mod:`lopt.eval.evaluation`),
the validation suite and its gate (:mod:`lopt.eval.validation`), paired bootstrap intervals
(:mod:`lopt.eval.bootstrap`), the report's plots (:mod:`lopt.eval.plots`) and the quality
benchmark's arithmetic: steps-to-target medians, summaries, break-even (:mod:`lopt.eval.report`)."""
