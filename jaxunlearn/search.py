"""Search spaces of the methods' hyperparameters, what a config narrows or fixes, tuned settings.

Each method module declares `SEARCH_SPACE`: {field of its section: `Range`}, the
fields that matter with the ranges of its reference's grids. `config.tune.space`
narrows or fixes any of them ("scrub.alpha=1e-3:1e-1,salun.mask_fraction=0.5");
`space(config, method)` is the result, `suggest` draws one trial's values from it.
`config.tuned` names a `tuned.json` whose settings `with_tuned` applies.
"""
from __future__ import annotations

import dataclasses
import json
import math

from jaxunlearn import fields

# What a search minimises (or maximises): the avg gap to Gold, ToW, or one metric's gap.
OBJECTIVES = ("avg_gap", "tow")
SAMPLERS = ("tpe", "random")


@dataclasses.dataclass(frozen=True)
class Range:
  """A hyperparameter's values: [low, high], log or linear scale, integers or floats.

  low == high fixes it."""
  low: float
  high: float
  log: bool = False
  integer: bool = False

  def describe(self) -> str:
    if self.low == self.high:
      return _fmt(self.low)
    kind = ("log " if self.log else "") + ("int" if self.integer else "")
    return f"[{_fmt(self.low)}, {_fmt(self.high)}]" + (f" {kind.strip()}" if kind.strip() else "")


def _fmt(v: float) -> str:
  return f"{v:g}"


def training(lr=(1e-5, 1e-1), epochs=(1, 10), **extra) -> dict[str, Range]:
  """The space of a trained method: learning rate log-uniform (Unlearn-Sparse's search), epochs."""
  return {"learning_rate": Range(*lr, log=True), "epochs": Range(*epochs, integer=True), **extra}


def declared(method: str) -> dict[str, Range]:
  from jaxunlearn.methods import METHODS
  return dict(getattr(METHODS[method], "SEARCH_SPACE", {}))


def _parse_one(item: str, method_names) -> tuple[str, str, float, float | None]:
  """"method.field=value" or "method.field=low:high" -> (method, field, low, high or None)."""
  key, sep, value = item.partition("=")
  method, dot, name = key.strip().partition(".")
  if not sep or not dot:
    fields.fail("tune.space", f"{item!r} must be method.field=value or method.field=low:high, "
                "e.g. scrub.alpha=0.001:0.1")
  if method not in method_names:
    fields.fail("tune.space", f"{item!r}: unknown method {method!r}; allowed: {', '.join(method_names)}")
  space = declared(method)
  if name not in space:
    fields.fail("tune.space", f"{item!r}: {method} searches {', '.join(space) or 'nothing'}; "
                f"set other fields as --config.{method}.<field>")
  try:
    bounds = [float(v) for v in value.split(":")]
  except ValueError:
    bounds = []
  if len(bounds) not in (1, 2) or not all(math.isfinite(b) for b in bounds):
    fields.fail("tune.space", f"{item!r}: the value must be a number or low:high")
  return method, name, bounds[0], bounds[1] if len(bounds) == 2 else None


def overrides(text: str) -> dict[str, dict[str, Range]]:
  """`tune.space` as {method: {field: Range}} (one line naming the item on a bad one)."""
  from jaxunlearn.methods import METHODS
  out: dict[str, dict[str, Range]] = {}
  for item in fields.names(text):
    method, name, low, high = _parse_one(item, tuple(METHODS))
    r = declared(method)[name]
    high = low if high is None else high
    if low > high or (r.log and low <= 0) or (r.integer and (low != int(low) or high != int(high))):
      fields.fail("tune.space", f"{item!r}: needs low <= high" + (", both > 0 (log scale)" if r.log else "")
                  + (", integers" if r.integer else ""))
    out.setdefault(method, {})[name] = dataclasses.replace(r, low=low, high=high)
  return out


def space(config, method: str) -> dict[str, Range]:
  """The method's search space: its declared one with `config.tune.space` applied."""
  return {**declared(method), **overrides(config.tune.space).get(method, {})}


def suggest(trial, space_: dict[str, Range]) -> dict[str, float]:
  """One trial's values (an Optuna trial's suggestions), fixed fields as they are."""
  out = {}
  for name, r in space_.items():
    if r.low == r.high:
      out[name] = int(r.low) if r.integer else r.low
    elif r.integer:
      out[name] = trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
    else:
      out[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
  return out


def method_list(config) -> tuple[str, ...]:
  from jaxunlearn.methods import METHODS
  m = fields.names(config.tune.methods)
  return tuple(METHODS) if m == ("all",) else m


def validate(c) -> None:
  """Checks the `tune` section and `tuned` (called by `config.validate`)."""
  from jaxunlearn.methods import METHODS
  fields.check_str(c, "tune.methods", 'a comma-separated string of methods, "all" or ""')
  for m in method_list(c):
    if m not in METHODS:
      fields.fail("tune.methods", f"unknown method {m!r}; allowed: {', '.join(METHODS)}, or all")
    if not declared(m):
      fields.fail("tune.methods", f"{m} declares no search space")
  if method_list(c) and c.distributed:
    fields.fail("tune.methods", "a search runs in one process (on all its devices), not across "
                "hosts: tune without distributed=true, then run the cluster with --config.tuned")
  fields.check_int(c, "tune.trials")
  fields.check_str(c, "tune.objective")
  from jaxunlearn import evaluate
  allowed = OBJECTIVES + tuple(f"gap_{k}" for k in evaluate.GAP_METRICS)
  if c.tune.objective not in allowed:
    fields.fail("tune.objective", f"unknown objective {c.tune.objective!r}; allowed: {', '.join(allowed)}")
  fields.check_choice(c, "tune.sampler", SAMPLERS)
  fields.check_int(c, "tune.seed", 0)
  fields.check_float(c, "tune.minutes", 0)
  fields.check_str(c, "tune.space", "method.field=value or low:high items, comma-separated")
  overrides(c.tune.space)
  fields.check_float(c, "data.validation_fraction", 0, 1, open_low=True)
  fields.check_str(c, "tuned", "the path of a tuned.json", optional=True)


def read_tuned(path: str) -> dict[str, dict[str, float]]:
  """A `tuned.json` ({method: {field: value}}), checked: one line on anything wrong."""
  from jaxunlearn.methods import METHODS
  try:
    with open(path) as f:
      tuned = json.load(f)
  except (OSError, ValueError) as e:
    fields.fail("tuned", f"cannot read {path!r} ({getattr(e, 'strerror', None) or type(e).__name__}); "
                "give the tuned.json a tuning run wrote")
  if not isinstance(tuned, dict) or not all(isinstance(v, dict) for v in tuned.values()):
    fields.fail("tuned", f"{path!r} is not {{method: {{field: value}}}}")
  for m, values in tuned.items():
    for name, value in values.items():
      if m not in METHODS or name not in declared(m) or not isinstance(value, (int, float)):
        fields.fail("tuned", f"{path!r}: {m}.{name}={value!r} is not a searched field of a method")
  return tuned


def apply(config, tuned: dict[str, dict[str, float]]):
  """A copy of `config` with the tuned settings in the methods' sections."""
  c = config.copy_and_resolve_references()
  for m, values in tuned.items():
    for name, value in values.items():
      c[m][name] = type(c[m][name])(value)
  return c


def with_tuned(config):
  """`config` with `config.tuned`'s settings applied ("" or None: unchanged)."""
  return apply(config, read_tuned(config.tuned)) if config.tuned else config
