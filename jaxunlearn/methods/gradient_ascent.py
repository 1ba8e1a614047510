"""Gradient ascent (GA, NegGrad): maximise the cross-entropy on the forget set, nothing else.

Reference: Unlearn-Sparse `unlearn/GA.py` (Thudi et al. 2022; Jia et al. 2023):
minimise -CE on forget batches, SGD momentum 0.9, weight decay 5e-4, lr 1e-4
(class-wise; maintainers grid-search it in [1e-5, 0.1]), 5 epochs.

Modes: train mode, as `GA.py`'s `model.train()` loop.
Augmentation (with `data.augment`): yes, as Unlearn-Sparse's forget loader.
"""
from jaxunlearn import objectives, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "Gradient Ascent"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training()


def get_config():
  return base.section(learning_rate=1e-4, epochs=5, weight_decay=5e-4)


def recipe(s):
  # Minus the cross-entropy, minimised: the step CE training compiled, run with sign -1.
  return train.Recipe([train.Phase("ascent", objectives.cross_entropy,
                                   {"data": train.Stream("forget", epochs=s.epochs)}, base.optimizer(s),
                                   sign=-1.0)])


validate = base.validate_optimizer
