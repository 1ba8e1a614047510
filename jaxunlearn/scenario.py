"""Which training examples are forgotten: computed once, here, and used everywhere.

The trainer's pools, the evaluation's forget/retain splits and the t-SNE subset
all read one `Scenario`; no other module derives the forget set itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxunlearn import datasets


@dataclasses.dataclass(frozen=True)
class Scenario:
  kind: str  # "class": every training example of the forgotten classes
  classes: tuple[int, ...]  # the forgotten classes
  forget_train: np.ndarray  # (N,) bool over the training set
  forget_test: np.ndarray  # (M,) bool over the test set: test examples of forgotten classes

  def pools(self) -> dict[str, np.ndarray]:
    """Training-set indices of each pool the trainer draws batches from."""
    n = len(self.forget_train)
    return {"all": np.arange(n), "forget": np.flatnonzero(self.forget_train),
            "retain": np.flatnonzero(~self.forget_train)}

  def describe(self) -> str:
    return (f"{int(self.forget_train.sum())} forget / {int((~self.forget_train).sum())} retain "
            f"training examples (class {', '.join(map(str, self.classes))})")


def from_config(config, data: datasets.Dataset) -> Scenario:
  """Class-wise forgetting of `config.forget_class`."""
  classes = (int(config.forget_class),)
  forget_train = np.isin(data.train_labels, classes)
  if not forget_train.any() or forget_train.all():
    raise ValueError(f"config.forget_class: class {classes[0]} leaves an empty forget or retain "
                     f"set in {config.data.name}; choose another class")
  return Scenario("class", classes, forget_train, np.isin(data.test_labels, classes))
