"""Config field checks: one-line errors that name the field and what is allowed.

Shared by the base config (`config.py`), the model registry and every method
module; it imports none of them, so nothing here closes an import cycle.
"""
from __future__ import annotations

import contextlib
import difflib
import math

import ml_collections


def fail(field: str, message: str):
  raise ValueError(f"config.{field}: {message}")


def names(value) -> tuple[str, ...]:
  """A comma-separated list ("a,b", as the command line gives it) or a sequence, as a tuple."""
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def listed(c, field: str) -> tuple[str, ...]:
  """A comma-separated field's items ("" has none), refused when one is empty or repeated.

  `names` skips empty items, so "0,,1" or a trailing comma ("3,": a list, or the count 3?)
  would otherwise mean something nobody wrote.
  """
  value = field_value(c, field)
  if not isinstance(value, str) or not value.strip():
    return names(value) if isinstance(value, str) else ()
  items = tuple(v.strip() for v in value.split(","))
  if "" in items:
    fail(field, f"has an empty item in {value!r}; separate items by single commas, with none "
         "at either end")
  twice = [v for i, v in enumerate(items) if v in items[:i]]
  if twice:
    fail(field, f"lists {twice[0]!r} twice in {value!r}")
  return items


@contextlib.contextmanager
def blamed_on(field: str, value, library: str, hint: str = ""):
  """A library's ValueError about a field's value (scikit-learn's split sizes) as one line
  naming `config.<field>`, in the library's own words (`hint`: how its terms map to ours)."""
  try:
    yield
  except ValueError as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    fail(field, f"{value!r} cannot be used; {library} says: {reason}{hint}")


def field_names(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of every field of `c` (sections are walked, not listed): "model.depth", ..."""
  out = []
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += field_names(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


def closest(name: str, candidates, n: int = 3) -> list[str]:
  """The `n` candidates most like `name` (difflib's ratio), best first; never empty."""
  candidates = list(candidates)
  return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6) or \
      difflib.get_close_matches(name, candidates, n=n, cutoff=0.0)


def field_value(c, field: str):
  """The value of a dotted field name ("model.depth")."""
  value = c
  for part in field.split("."):
    value = value[part]
  return value


def check_int(c, field: str, low: int = 1, below: int = 2 ** 31):
  """An int in [low, below); the default bound keeps it an int32, as JAX and numpy take it."""
  value = field_value(c, field)
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    fail(field, f"must be an integer >= {low}, got {value!r}")
  if value >= below:
    fail(field, f"must be below {'2**31' if below == 2 ** 31 else below}, got {value}")


def check_float(c, field: str, low: float, high: float = math.inf, *, open_low=False,
                 open_high=True):
  value = field_value(c, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if open_low else value >= low) and (
      value < high if open_high else value <= high)
  if not ok:
    lo, hi = "(" if open_low else "[", ")" if open_high else "]"
    fail(field, f"must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")


def check_bool(c, field: str) -> None:
  value = field_value(c, field)
  if not isinstance(value, bool):
    fail(field, f"must be true or false, got {value!r}")


def check_str(c, field: str, what: str = "a string", *, optional: bool = False) -> None:
  """A string (`optional`: or None, the default of fields that name a file or folder)."""
  value = field_value(c, field)
  if not (isinstance(value, str) or (optional and value is None)):
    fail(field, f"must be {what}{' or None' if optional else ''}, got {value!r}")


def check_choice(c, field: str, allowed) -> None:
  check_str(c, field)
  if field_value(c, field) not in allowed:
    fail(field, f"unknown value {field_value(c, field)!r}; allowed: {', '.join(allowed)}")


def check_optimizer(c, section: str) -> None:
  """The optimizer fields every training section has (`optimizers.section_fields`)."""
  from jaxunlearn import optimizers  # numpy and optax only: no cycle
  check_int(c, f"{section}.epochs")
  check_float(c, f"{section}.learning_rate", 0, open_low=True)
  check_float(c, f"{section}.momentum", 0, 1)
  check_float(c, f"{section}.weight_decay", 0)
  check_choice(c, f"{section}.optimizer", optimizers.KINDS)
  check_float(c, f"{section}.beta2", 0, 1)
  check_float(c, f"{section}.eps", 0, open_low=True)
  check_choice(c, f"{section}.schedule", optimizers.SCHEDULES)
  check_float(c, f"{section}.final_learning_rate", 0)
  check_str(c, f"{section}.decay_epochs", 'comma-separated epochs ("91,136") or ""')
  try:
    decay = [float(e) for e in names(field_value(c, f"{section}.decay_epochs"))]
  except ValueError:
    decay = None
  epochs = field_value(c, f"{section}.epochs")
  # The range is checked where it is used: a shortened run of a "step" config may
  # switch the schedule off without clearing its epochs.
  in_range = all(0 < e and (e <= epochs or field_value(c, f"{section}.schedule") != "step")
                 for e in decay or [])
  if decay is None or not in_range or decay != sorted(set(decay)):
    fail(f"{section}.decay_epochs", "must be increasing epochs in (0, epochs], comma-separated, "
         f"e.g. \"91,136\"; got {field_value(c, f'{section}.decay_epochs')!r}")
  check_float(c, f"{section}.decay_factor", 0, open_low=True)
  check_float(c, f"{section}.warmup_epochs", 0, epochs, open_high=False)
  check_int(c, f"{section}.batch_size", 0)
