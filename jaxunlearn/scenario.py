"""Which training examples are forgotten: computed once, here, and used everywhere.

The trainer's pools, the evaluation's forget/retain splits and the t-SNE subset
all read one `Scenario`; no other module derives the forget set itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxunlearn import datasets, fields


KINDS = ("class", "random", "subclass")


@dataclasses.dataclass(frozen=True)
class Scenario:
  # "class": every training example of the forgotten classes; "random": a seeded,
  # stratified fraction of the training set; "subclass": every training example of one
  # fine class, inside its coarse class (the labels learnt).
  kind: str
  # The forgotten classes ("class"), or the coarse class holding the forgotten fine
  # class ("subclass"); () for "random".
  classes: tuple[int, ...]
  forget_train: np.ndarray  # (N,) bool over the training set
  # (M,) bool over the test set: the forgotten classes' (or fine class's) test examples;
  # all False for "random", where no test example belongs to the forget set.
  forget_test: np.ndarray
  # What is forgotten, for people: "class 0 (airplane)", "sub-class rocket (19) of
  # class 19 (vehicles_2)", "a random stratified subset".
  what: str = ""
  # (N,) the class SSD's reference groups each training example by for its full-data
  # sweep (the label, or the fine class in "subclass"); None: data-set order ("random").
  sweep_classes: np.ndarray | None = None

  def pools(self) -> dict[str, np.ndarray]:
    """Training-set indices of each pool the trainer draws batches from.

    "retain_then_forget" is SSD's full-data pool in the reference's order
    (if-loops/selective-synaptic-dampening `forget_*_main.py`: an unshuffled loader over
    ConcatDataset(retain, forget), with the retain set built class by class): the retain
    examples sorted by `sweep_classes` (stable: data-set order within a class), then the
    forget set.
    """
    n = len(self.forget_train)
    forget, retain = np.flatnonzero(self.forget_train), np.flatnonzero(~self.forget_train)
    grouped = (retain if self.sweep_classes is None
               else retain[np.argsort(self.sweep_classes[retain], kind="stable")])
    return {"all": np.arange(n), "forget": forget, "retain": retain,
            "retain_then_forget": np.r_[grouped, forget]}

  def describe(self) -> str:
    return (f"{int(self.forget_train.sum()):,} forget / {int((~self.forget_train).sum()):,} retain "
            f"training examples ({self.what})")


def forget_classes(config) -> tuple[int, ...]:
  """`config.forget_class` ("3" or "0,3") as a tuple of ints."""
  return tuple(sorted({int(v) for v in fields.names(str(config.forget_class))}))


def _named(k: int, names) -> str:
  """"3" for digits' classes, "0 (airplane)" where the class has a name of its own."""
  return str(k) if names[k] == str(k) else f"{k} ({names[k]})"


def fine_class(value: str, data: datasets.Dataset) -> int:
  """The fine class `forget_subclass` names (a fine class name, or its number)."""
  names, value = data.fine_class_names, value.strip()
  if value in names:
    return names.index(value)
  if value.isdigit() and int(value) < len(names):
    return int(value)
  shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
  fields.fail("forget_subclass", f"{value!r} is not a fine class of the data set; allowed: a name "
              f"({shown}) or a number 0..{len(names) - 1}")


def _subclass(config, data: datasets.Dataset) -> Scenario:
  if data.train_fine_labels is None:
    fields.fail("scenario", f"\"subclass\" needs coarse labels over fine ones, which "
                f"{config.data.name} with data.label={config.data.label!r} lacks; set "
                "data.label=coarse (cifar100: CIFAR-20; digits: digit pairs)")
  k = fine_class(config.forget_subclass, data)
  forget_train = data.train_fine_labels == k
  coarse = np.unique(data.train_labels[forget_train])
  if len(coarse) != 1 or forget_train.all():
    fields.fail("forget_subclass", f"{config.forget_subclass!r} has {forget_train.sum()} training "
                f"examples in {len(coarse)} coarse classes; choose a fine class inside one "
                "coarse class that leaves a retain set")
  c = int(coarse[0])
  what = (f"sub-class {_named(k, data.fine_class_names)} of class "
          f"{_named(c, data.class_names)}")
  # The reference groups the sub-class scenario's retain set by fine class
  # (`forget_subclass_strategies.get_classwise_ds` keys on the fine label).
  return Scenario("subclass", (c,), forget_train, data.test_fine_labels == k, what,
                  data.train_fine_labels)


def from_config(config, data: datasets.Dataset) -> Scenario:
  """The forget set `config.scenario` describes (`forget_class`; `forget_fraction` and
  `seed`; or `forget_subclass`)."""
  n = len(data.train_labels)
  if config.scenario == "subclass":
    return _subclass(config, data)
  if config.scenario == "random":
    from sklearn.model_selection import train_test_split
    with fields.blamed_on("forget_fraction", config.forget_fraction,
                          "scikit-learn's stratified split",
                          " (its test part is the forget set)"):
      _, forget_idx = train_test_split(np.arange(n), test_size=config.forget_fraction,
                                       stratify=data.train_labels, random_state=config.seed)
    forget_train = np.zeros(n, bool)
    forget_train[forget_idx] = True
    # No class grouping: the reference's retain set is a random_split, in no class order.
    return Scenario("random", (), forget_train, np.zeros(len(data.test_labels), bool),
                    f"a random stratified {config.forget_fraction:g} of the training set")
  classes = forget_classes(config)
  forget_train = np.isin(data.train_labels, classes)
  if not forget_train.any() or forget_train.all():
    raise ValueError(f"config.forget_class: {config.forget_class} leaves an empty forget or retain "
                     f"set in {config.data.name}; choose other classes")
  what = (f"class{'es' if len(classes) > 1 else ''} "
          + ", ".join(_named(k, data.class_names) for k in classes))
  return Scenario("class", classes, forget_train, np.isin(data.test_labels, classes), what,
                  data.train_labels)
