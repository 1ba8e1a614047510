"""The base config every experiment derives from, and its validation.

Experiment files in `configs/` call `get_base_config()`, override what differs
and return it. `validate` runs before any work and stops on the first bad field
with a one-line error that names it and what is allowed.
"""
from __future__ import annotations

import math
import os

import jax.numpy as jnp
import ml_collections

from jaxunlearn import datasets, model as model_lib


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Seed of parameter initialisation, shuffling, the random forget subset and t-SNE
  # subset selection (a single run, in the workdir itself).
  c.seed = 42
  # Several runs, one per seed, each in workdir/seed_<n>, summarised as mean ± sd:
  # comma-separated seeds ("0,1,2") or a count ("5" = seeds 0..4). "" runs `seed` alone.
  c.seeds = ""
  # Which training examples are forgotten: "class" (every example of `forget_class`)
  # or "random" (a seeded, stratified `forget_fraction` of the training set).
  c.scenario = "class"
  # scenario "class": the class(es) whose training examples form the forget set ("0", "0,3").
  c.forget_class = "0"
  # scenario "random": the forgotten fraction of the training set, stratified by class.
  c.forget_fraction = 0.1

  c.data = ml_collections.ConfigDict()
  # Data set: "digits" (scikit-learn, offline), "cifar10" (tensorflow-datasets) or
  # "synthetic" (random images and labels, for benchmarks and hardware checks).
  c.data.name = "digits"
  # digits only: fraction of examples held out as the test set (stratified).
  c.data.test_size = 0.25
  # digits only: random_state of the stratified train/test split.
  c.data.split_seed = 0
  # cifar10 only: tfds data_dir (None: tfds' default, ~/tensorflow_datasets).
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  # cifar10 only: folder holding a manually downloaded cifar-10-binary.tar.gz.
  c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
  # cifar10 only: prepare the data set when it is missing (needs TensorFlow + network).
  c.data.prepare = False

  # synthetic only: sizes of the random data set (CIFAR-10's by default).
  c.data.synthetic = ml_collections.ConfigDict(dict(num_train=50_000, num_test=10_000, image_size=32))

  c.model = ml_collections.ConfigDict()
  # Registered architecture ("Ti/16", ...), or "" to use the explicit sizes below.
  c.model.variant = ""
  # Input resolution in pixels; images are resized to it (bilinear) inside the step.
  c.model.image_size = 8
  c.model.patch_size = 2  # pixels per patch side
  c.model.hidden_size = 64  # token width
  c.model.depth = 4  # transformer blocks
  c.model.num_heads = 4
  c.model.mlp_dim = 128  # hidden units of each block's MLP
  c.model.layer_norm_eps = 1e-6
  # Compute dtype: "float32" (matches the study) or "bfloat16" (parameters and
  # optimizer state stay float32; softmax and logits are computed in float32).
  c.model.dtype = "float32"
  # Pretrained weights to start from (safetensors file, folder or hub id), or
  # None to train from a random initialisation. With weights, the architecture
  # (sizes, LayerNorm eps) is read from the source, and must equal `variant`
  # when that is set; image_size still sets the input resolution (position
  # embeddings are resized to it). The head is always re-initialised.
  c.model.init = ml_collections.FieldReference(None, field_type=str)

  # Examples per optimizer step, in total over all devices (every stage).
  c.batch_size = 64

  # Original (all training data) and Gold (retrain on the retain set only): the same
  # recipe, from the same initialisation (or pretrained weights). The study's SGD.
  c.train = ml_collections.ConfigDict(dict(
      epochs=3,  # passes over the training data
      learning_rate=1e-4,  # constant
      momentum=0.9,
      weight_decay=0.0,  # added to the gradient, as torch.optim.SGD
  ))

  # Unlearning methods to run, comma-separated ("finetune,salun" or "all"); each
  # starts from the Original. Every method's section below holds its hyperparameters,
  # defaults from its reference code (see jaxunlearn/methods/<name>.py).
  c.methods = "finetune,gradient_ascent,two_stage"
  from jaxunlearn.methods import METHODS
  for name, module in METHODS.items():
    c[name] = module.get_config()

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512  # examples per evaluation forward pass, in total

  c.tsne = ml_collections.ConfigDict()
  # Whole shuffled training batches are taken until at least this many examples
  # of each kind are collected; the same images go through every model.
  c.tsne.num_retain = 300
  c.tsne.num_forget = 300
  c.tsne.perplexity = 30.0

  # Training steps run as one compiled call (lax.scan); the progress bar moves per chunk.
  c.steps_per_chunk = 50
  # Show progress bars.
  c.progress = True
  # Run independent work at once, one task per CPU core (Original with Gold, the
  # methods, each model's evaluation and t-SNE as soon as it is trained) when JAX
  # runs on the CPU in one process: small models leave cores idle. Ignored on
  # accelerators and multi-host runs. Results are identical either way; each
  # stage's time is then its wall time while sharing the machine.
  c.concurrent_stages = True
  # JAX's persistent compilation cache: compiled steps are kept on disk and reused by
  # later runs of the same shapes (another seed, forget class, method list...): on
  # the 2-core CPU a second digits run needed 12-38 CPU-seconds less. "" turns it off;
  # a cache dir set through JAX (JAX_COMPILATION_CACHE_DIR) takes precedence. Takes
  # effect when set before the process's first compilation (the CLI does).
  c.compilation_cache = os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxunlearn", "xla")
  # Multi-host runs: one process per host, each started with distributed=True.
  # The cluster comes from the fields below, else from the environment
  # (JAXUNLEARN_COORDINATOR_ADDRESS, JAXUNLEARN_NUM_PROCESSES, JAXUNLEARN_PROCESS_ID), else
  # from what jax.distributed.initialize() detects itself (Cloud TPU, SLURM, ...).
  c.distributed = False
  c.cluster = ml_collections.ConfigDict(dict(
      coordinator_address="",  # host:port of process 0's coordinator service
      num_processes=0,  # processes in the run (0: from the environment)
      process_id=-1,  # this process's index (-1: from the environment)
      # Seconds a process waits for the others (start-up; a lost peer) before it
      # stops with an error instead of hanging.
      timeout_seconds=120,
  ))
  return c


def _fail(field: str, message: str):
  raise ValueError(f"config.{field}: {message}")


def names(value) -> tuple[str, ...]:
  """A comma-separated list ("a,b", as the command line gives it) or a sequence, as a tuple."""
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def seed_list(c) -> tuple[int, ...] | None:
  """The seeds of a multi-seed run, or None for a single run of `seed`."""
  parts = names(c.seeds)
  if not parts:
    return None
  values = tuple(int(p) for p in parts)
  return tuple(range(values[0])) if len(values) == 1 else values


def method_names(c) -> tuple[str, ...]:
  from jaxunlearn.methods import METHODS
  m = names(c.methods)
  return tuple(METHODS) if m == ("all",) else m


def _number(c, field: str):
  value = c
  for part in field.split("."):
    value = value[part]
  return value


def check_int(c, field: str, low: int = 1):
  value = _number(c, field)
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    _fail(field, f"must be an integer >= {low}, got {value!r}")


def check_float(c, field: str, low: float, high: float = math.inf, *, open_low=False,
                 open_high=True):
  value = _number(c, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if open_low else value >= low) and (
      value < high if open_high else value <= high)
  if not ok:
    lo, hi = "(" if open_low else "[", ")" if open_high else "]"
    _fail(field, f"must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")


def check_optimizer(c, section: str) -> None:
  """The SGD fields every training section has: epochs, learning_rate, momentum, weight_decay."""
  check_int(c, f"{section}.epochs")
  check_float(c, f"{section}.learning_rate", 0, open_low=True)
  check_float(c, f"{section}.momentum", 0, 1)
  check_float(c, f"{section}.weight_decay", 0)


def validate(c: ml_collections.ConfigDict) -> None:
  from jaxunlearn.methods import METHODS
  if c.data.name not in datasets.NUM_CLASSES:
    _fail("data.name", f"unknown data set {c.data.name!r}; allowed: {', '.join(datasets.NUM_CLASSES)}")
  num_classes = datasets.NUM_CLASSES[c.data.name]
  check_int(c, "seed", 0)
  if c.seed >= 2 ** 31:
    _fail("seed", f"must be below 2**31, got {c.seed}")
  if not isinstance(c.seeds, str):
    _fail("seeds", f"must be a comma-separated string of seeds or a count, got {c.seeds!r}")
  try:
    seeds = seed_list(c)
  except ValueError:
    _fail("seeds", f"must be comma-separated integers (\"0,1,2\") or a count (\"5\"), got {c.seeds!r}")
  if seeds is not None:
    if not seeds or any(not 0 <= s < 2 ** 31 for s in seeds) or len(set(seeds)) != len(seeds):
      _fail("seeds", f"must name distinct seeds in [0, 2**31) or a count >= 1, got {c.seeds!r}")
  if c.scenario not in ("class", "random"):
    _fail("scenario", f"unknown scenario {c.scenario!r}; allowed: class, random")
  if c.scenario == "class":
    try:
      classes = [int(v) for v in names(str(c.forget_class))]
    except ValueError:
      _fail("forget_class", f"must be class numbers, e.g. \"3\" or \"0,3\"; got {c.forget_class!r}")
    if not classes:
      _fail("forget_class", "is empty; name at least one class")
    for k in classes:
      if not 0 <= k < num_classes:
        _fail("forget_class", f"{k} is out of range; allowed: 0..{num_classes - 1} for {c.data.name}")
    if len(set(classes)) == num_classes:
      _fail("forget_class", f"forgets every class of {c.data.name}; leave at least one")
  else:
    check_float(c, "forget_fraction", 0, 1, open_low=True)
  if not isinstance(c.methods, str):
    _fail("methods", f"must be a comma-separated string, got {c.methods!r}")
  methods = method_names(c)
  if not methods:
    _fail("methods", f"is empty; allowed: any of {', '.join(METHODS)}, or all")
  for m in methods:
    if m not in METHODS:
      _fail("methods", f"unknown method {m!r}; allowed: {', '.join(METHODS)}, or all")
  if len(set(methods)) != len(methods):
    _fail("methods", f"lists a method twice: {','.join(methods)}")
  for field in ("batch_size", "steps_per_chunk", "eval.batch_size", "model.image_size"):
    check_int(c, field)
  check_optimizer(c, "train")
  for m in methods:
    METHODS[m].validate(c, m)
  if c.model.variant and c.model.variant not in model_lib.VARIANTS:
    _fail("model.variant", f"unknown variant {c.model.variant!r}; allowed: \"\" or "
          f"{', '.join(model_lib.VARIANTS)}")
  if c.model.dtype not in DTYPES:
    _fail("model.dtype", f"unknown dtype {c.model.dtype!r}; allowed: {', '.join(DTYPES)}")
  if not c.model.init:
    sizes = model_lib.model_kwargs(c.model, num_classes)
    if sizes["image_size"] % sizes["patch_size"]:
      _fail("model.patch_size", f"{sizes['patch_size']} does not divide image_size {sizes['image_size']}")
    if sizes["hidden_size"] % sizes["num_heads"]:
      _fail("model.num_heads", f"{sizes['num_heads']} does not divide hidden_size {sizes['hidden_size']}")
  if not isinstance(c.compilation_cache, str):
    _fail("compilation_cache", f"must be a folder path or \"\" (off), got {c.compilation_cache!r}")
  if not isinstance(c.concurrent_stages, bool):
    _fail("concurrent_stages", f"must be true or false, got {c.concurrent_stages!r}")
  if not 0 < c.data.test_size < 1:
    _fail("data.test_size", f"must be in (0, 1), got {c.data.test_size!r}")
  if c.tsne.num_retain < 0 or c.tsne.num_forget < 0:
    _fail("tsne", "num_retain and num_forget must be >= 0 (0 skips the t-SNE figure)")
