"""Which training examples are forgotten: computed once, here, and used everywhere.

The trainer's pools, the evaluation's forget/retain splits and the t-SNE subset
all read one `Scenario`; no other module derives the forget set itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxunlearn import datasets, fields


KINDS = ("class", "random")


@dataclasses.dataclass(frozen=True)
class Scenario:
  # "class": every training example of the forgotten classes; "random": a seeded,
  # stratified fraction of the training set.
  kind: str
  classes: tuple[int, ...]  # the forgotten classes ("class" only)
  forget_train: np.ndarray  # (N,) bool over the training set
  # (M,) bool over the test set: the forgotten classes' test examples ("class");
  # all False for "random", where no test example belongs to the forget set.
  forget_test: np.ndarray

  def pools(self) -> dict[str, np.ndarray]:
    """Training-set indices of each pool the trainer draws batches from."""
    n = len(self.forget_train)
    return {"all": np.arange(n), "forget": np.flatnonzero(self.forget_train),
            "retain": np.flatnonzero(~self.forget_train)}

  def describe(self) -> str:
    what = (f"class {', '.join(map(str, self.classes))}" if self.kind == "class"
            else "a random stratified subset")
    return (f"{int(self.forget_train.sum())} forget / {int((~self.forget_train).sum())} retain "
            f"training examples ({what})")


def forget_classes(config) -> tuple[int, ...]:
  """`config.forget_class` ("3" or "0,3") as a tuple of ints."""
  return tuple(sorted({int(v) for v in fields.names(str(config.forget_class))}))


def from_config(config, data: datasets.Dataset) -> Scenario:
  """The forget set `config.scenario` describes (`forget_class`, or `forget_fraction` and `seed`)."""
  n = len(data.train_labels)
  if config.scenario == "random":
    from sklearn.model_selection import train_test_split
    _, forget_idx = train_test_split(np.arange(n), test_size=config.forget_fraction,
                                     stratify=data.train_labels, random_state=config.seed)
    forget_train = np.zeros(n, bool)
    forget_train[forget_idx] = True
    return Scenario("random", (), forget_train, np.zeros(len(data.test_labels), bool))
  classes = forget_classes(config)
  forget_train = np.isin(data.train_labels, classes)
  if not forget_train.any() or forget_train.all():
    raise ValueError(f"config.forget_class: {config.forget_class} leaves an empty forget or retain "
                     f"set in {config.data.name}; choose other classes")
  return Scenario("class", classes, forget_train, np.isin(data.test_labels, classes))
