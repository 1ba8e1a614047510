"""What a config asks of this machine, checked before any work: memory and steps.

From the config's sizes alone (nothing is allocated, traced or compiled), `check`
estimates what one device must hold: the data set (kept whole on every device), the
parameters with their gradients and optimizer state, the activations of a training
and of an evaluation batch, and a chunk's batch tables. Each term counts only what
surely is there (SGD's single optimizer slot, one saved tensor per layer output, no
XLA workspace), so the estimate is low rather than high: what it refuses cannot run.
A config that needs more than the devices have stops with one line that names the
field to lower (the one whose default value would save the most) and the largest
value that fits. `check_steps` keeps every stage's step count an int32, as the step
counters are.
"""
from __future__ import annotations

import math

import jax

from jaxunlearn import config as config_lib, datasets, fields

# digits as `datasets.load_digits` gives them: examples, stored side, channels.
DIGITS = (1797, 8, 1)
# Step counters (the loop's positions, optax's counts) are int32.
MAX_STEPS = 2 ** 31 - 1
_F32 = 4


def _used_sections(c) -> tuple[str, ...]:
  return ("train", *config_lib.method_names(c))


def train_batch(c) -> tuple[int, str]:
  """(the largest training batch of any stage run, the field that sets it)."""
  best = (c.batch_size, "batch_size")
  for section in _used_sections(c):
    for key, value in c[section].items():
      if key.endswith("batch_size") and isinstance(value, int) and value > best[0]:
        best = (value, f"{section}.{key}")
  return best


def data_shape(c) -> tuple[int, int, int, int] | None:
  """(examples, stored side, side after data.image_size, channels) when the config alone
  says (digits, synthetic); None for data sets known only once read."""
  if c.data.name == "digits":
    n, stored, channels = DIGITS
  elif c.data.name == "synthetic":
    s = c.data.synthetic
    n, stored, channels = s.num_train + s.num_test, s.image_size, 3
  else:
    return None
  return n, stored, c.data.image_size or stored, channels


def data_bytes(c) -> int:
  """uint8 images and int32 labels, resized ones beside the stored ones while resizing."""
  shape = data_shape(c)
  if shape is None:
    return 0  # checked by the loader from the file counts or metadata (`datasets.check_fits`)
  n, stored, side, channels = shape
  both = stored ** 2 + (side ** 2 if side != stored else 0)
  return n * (both * channels + 4)


def num_params(c, num_classes: int = 10) -> int:
  """Parameters of the configured architecture, from its sizes (0: pretrained, unknown)."""
  if c.model.name == "vit":
    if c.model.init:
      return 0
    from jaxunlearn.models import vit
    k = vit.model_kwargs(c.model.vit, num_classes)
    D, M, P = k["hidden_size"], k["mlp_dim"], k["patch_size"]
    tokens = (k["image_size"] // P) ** 2 + 1
    block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * M + M) + (M * D + D)
    return P * P * 3 * D + D + tokens * D + k["depth"] * block + 2 * D + D * num_classes
  from jaxunlearn.models import resnet
  variant = resnet.VARIANTS[c.model.name]
  stages = [int(v) for v in c.model.resnet.stage_sizes.split(",")] \
      if c.model.resnet.stage_sizes.strip() else variant["stage_sizes"]
  w, total = c.model.resnet.width, 0
  for i, blocks in enumerate(stages):
    out = w << i
    per_block = 13 * out * out if variant["block"] == "basic" else 17 * out * out
    total += blocks * per_block
  return total + 27 * w + (w << (len(stages) - 1)) * num_classes


def _side(c) -> int:
  """Pixels per side of the model's input (data.image_size, or 32, where the data set
  decides it)."""
  if c.model.name == "vit":
    return c.model.vit.image_size
  shape = data_shape(c)
  return shape[2] if shape else c.data.image_size or 32


def example_bytes(c, training: bool) -> int:
  """Activations one example needs: every layer's (training: kept for the backward
  pass) or the largest layer's (evaluation: freed as it goes)."""
  side, width = _side(c), 2 if c.model.dtype == "bfloat16" else _F32
  pixels = side * side * 3 * _F32
  if c.model.name == "vit":
    from jaxunlearn.models import vit
    k = vit.model_kwargs(c.model.vit, 10)
    D, M, H = k["hidden_size"], k["mlp_dim"], k["num_heads"]
    L = (side // k["patch_size"]) ** 2 + 1
    layer = L * (3 * D + M + H * L)
    return pixels + width * (k["depth"] * (layer + 2 * L * D) if training else 2 * layer)
  w = c.model.resnet.width
  if not training:
    return pixels + width * 2 * side * side * w
  stages = [int(v) for v in c.model.resnet.stage_sizes.split(",")] \
      if c.model.resnet.stage_sizes.strip() else (2, 2, 2, 2)
  per = sum(blocks * 4 * (side >> i) ** 2 * (w << i) for i, blocks in enumerate(stages))
  return pixels + width * per


def need(c, num_devices: int, shared_host: bool) -> dict[str, int]:
  """Bytes the config needs, by term: on each device, or on the host for CPU devices."""
  batch, _ = train_batch(c)
  copies = num_devices if shared_host else 1  # the data and state are replicated
  split = 1 if shared_host else num_devices  # a batch is split over the devices
  return {
      "the data set": copies * data_bytes(c),
      "parameters, gradients and optimizer state": copies * 3 * _F32 * num_params(c),
      "a training batch's activations": math.ceil(batch / split) * example_bytes(c, True),
      "an evaluation batch's activations": math.ceil(c.eval.batch_size / split)
                                           * example_bytes(c, False),
      "a chunk's batch tables": c.steps_per_chunk * batch * _F32,
  }


# Sizes a config may set too large, each checked by setting it back to its default.
CANDIDATES = ("data.synthetic.num_train", "data.synthetic.num_test", "data.synthetic.image_size",
              "data.image_size", "model.vit.image_size", "model.vit.hidden_size",
              "model.vit.depth", "model.vit.mlp_dim", "model.vit.num_heads",
              "model.resnet.width", "eval.batch_size", "steps_per_chunk")


def _total(c, devices) -> int:
  return sum(need(c, *devices).values())


def _with(c, field: str, value: int):
  out = c.copy_and_resolve_references()
  section, _, key = field.rpartition(".")
  (fields.field_value(out, section) if section else out)[key] = value
  return out


def _blame(c, devices) -> str:
  """The size field whose default would save the most memory."""
  base = config_lib.get_base_config()
  best, saved = None, -1
  for field in (*CANDIDATES, train_batch(c)[1]):
    default, value = fields.field_value(base, field), fields.field_value(c, field)
    if field.endswith("batch_size") and not default:
      default = base.batch_size
    if value > default:
      gain = _total(c, devices) - _total(_with(c, field, default), devices)
      if gain > saved:
        best, saved = field, gain
  return best


def _largest(c, field: str, devices, have: int) -> int:
  """The largest value of `field` (others as they are) whose estimate fits `have`."""
  low, high = 0, fields.field_value(c, field)
  while low < high:
    mid = (low + high + 1) // 2
    if _total(_with(c, field, mid), devices) <= have:
      low = mid
    else:
      high = mid - 1
  return low


def _memory(devices) -> tuple[int, str, int, bool]:
  """(bytes a device may use, what it is, device count, whether the host holds every copy)."""
  memory = [datasets.device_memory(d) for d in devices]
  if all(memory):
    have = min(memory)
    return have, f"{devices[0].device_kind} has {datasets.size_text(have)}", len(devices), False
  have = datasets.host_memory()
  return have, f"the host has {datasets.size_text(have)} available", len(devices), True


def check(c, devices=None, have: int | None = None) -> None:
  """Refuses, in one line naming a field and its limit, a config this machine cannot hold.

  `devices`: default this process's; `have` stands for each device's (or the host's)
  available memory, for tests. Call after joining a multi-host cluster.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if have is None:
    memory, where, n, shared = _memory(devices)
  else:  # as if on the host
    memory, where, n, shared = have, f"{datasets.size_text(have)} are available", len(devices), True
  terms = need(c, n, shared)
  if sum(terms.values()) <= memory:
    return
  field = _blame(c, (n, shared))
  term, largest = max(terms, key=terms.get), None
  if field is not None:
    largest = _largest(c, field, (n, shared), memory)
  field = field or train_batch(c)[1]
  limit = f"; at most {largest:,} fits" if largest else "; lower it or other sizes"
  fields.fail(field, f"{fields.field_value(c, field):,} needs at least "
              f"{datasets.size_text(sum(terms.values()))} of memory ({term}: "
              f"{datasets.size_text(terms[term])}), but {where}{limit}")


def check_steps(c, num_train: int) -> None:
  """Every stage run takes fewer than 2**31 steps (epochs x steps per epoch, at most)."""
  for section in _used_sections(c):
    s = c[section]
    if "epochs" not in s or "learning_rate" not in s:
      continue
    batch = s.get("batch_size", 0) or c.batch_size
    per_epoch = max(1, math.ceil(num_train / batch))
    if s.epochs * per_epoch > MAX_STEPS:
      fields.fail(f"{section}.epochs", f"{s.epochs:,} epochs of {per_epoch:,} steps exceed the "
                  f"int32 step counter; at most {MAX_STEPS // per_epoch:,} epochs")


def num_train(c) -> int | None:
  """Training examples when the config alone says (digits, synthetic), else None."""
  if c.data.name == "digits":
    return DIGITS[0] - math.ceil(DIGITS[0] * c.data.test_size)
  if c.data.name == "synthetic":
    return c.data.synthetic.num_train
  return None


def check_before_loading(c, devices=None) -> None:
  """`check`, then `check_steps` where the config gives the training-set size."""
  check(c, devices)
  n = num_train(c)
  if n is not None:
    check_steps(c, n)
