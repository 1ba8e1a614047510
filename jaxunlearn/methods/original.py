"""The Original: cross-entropy on all training data (what the deployed model is).

Trained from the run's initialisation (random, or pretrained weights with a fresh
head) with `config.train`; every unlearning method starts from it.

Modes: train mode, as Unlearn-Sparse `main_train.py`; evaluation in eval mode.
Augmentation (with `data.augment`): yes, Original and Gold train on the references' crop
and flip (Unlearn-Sparse `dataset.py`).
"""
from jaxunlearn import objectives, train
from jaxunlearn.methods import base

DISPLAY_NAME = "Original"
SECTION = "train"
POOL = "all"


def recipe(s, pool: str = POOL) -> train.Recipe:
  return train.Recipe([train.Phase("train", objectives.cross_entropy,
                                   {"data": train.Stream(pool, epochs=s.epochs)}, base.optimizer(s))])
