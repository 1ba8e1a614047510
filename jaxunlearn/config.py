"""The base config every experiment derives from, and its validation.

Experiment files in `configs/` call `get_base_config()`, override what differs
and return it. `validate` runs before any work and stops on the first bad field
with a one-line error that names it and what is allowed.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections

from jaxunlearn import datasets, model as model_lib


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Seed of parameter initialisation, shuffling and t-SNE subset selection.
  c.seed = 42
  # Class whose training examples form the forget set; all others form the retain set.
  c.forget_class = 0

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

  c.optimizer = ml_collections.ConfigDict()
  # SGD step size for training Original and Gold; constant (no schedule), as in the study.
  c.optimizer.learning_rate = 1e-4
  # SGD step size of every unlearning method.
  c.optimizer.unlearn_learning_rate = 1e-4
  c.optimizer.momentum = 0.9

  # Examples per optimizer step, in total over all devices.
  c.batch_size = 64
  # Epochs over the training data for the Original (all data) and Gold (retain only).
  c.train_epochs = 3
  # Epochs of each unlearning method over its driving data set.
  c.unlearn_epochs = 5
  # Unlearning methods to run, in order (see jaxunlearn/methods).
  c.methods = ("finetune", "gradient_ascent", "two_stage")

  c.two_stage = ml_collections.ConfigDict()
  c.two_stage.temperature = 1.15  # tau in S = z_f z_r^T / tau
  c.two_stage.stage1_steps = 1  # KL(uniform || p) steps on forget batches before stage 2

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
  # Call jax.distributed.initialize() first (multi-host runs: one process per host,
  # coordinator from the environment, e.g. on Cloud TPU or under SLURM).
  c.distributed = False
  return c


def _fail(field: str, message: str):
  raise ValueError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  from jaxunlearn.methods import METHODS
  if c.data.name not in datasets.NUM_CLASSES:
    _fail("data.name", f"unknown data set {c.data.name!r}; allowed: {', '.join(datasets.NUM_CLASSES)}")
  num_classes = datasets.NUM_CLASSES[c.data.name]
  if not 0 <= c.forget_class < num_classes:
    _fail("forget_class", f"{c.forget_class} is out of range; allowed: 0..{num_classes - 1} for {c.data.name}")
  methods = (c.methods,) if isinstance(c.methods, str) else tuple(c.methods)
  if not methods:
    _fail("methods", f"is empty; allowed: any of {', '.join(METHODS)}")
  for m in methods:
    if m not in METHODS:
      _fail("methods", f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
  if len(set(methods)) != len(methods):
    _fail("methods", f"lists a method twice: {methods}")
  for field in ("batch_size", "train_epochs", "unlearn_epochs", "steps_per_chunk",
                "eval.batch_size", "two_stage.stage1_steps", "model.image_size"):
    value = c[field] if "." not in field else c[field.split(".")[0]][field.split(".")[1]]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      _fail(field, f"must be a positive integer, got {value!r}")
  for field in ("learning_rate", "unlearn_learning_rate"):
    if not c.optimizer[field] > 0:
      _fail(f"optimizer.{field}", f"must be positive, got {c.optimizer[field]!r}")
  if not 0 <= c.optimizer.momentum < 1:
    _fail("optimizer.momentum", f"must be in [0, 1), got {c.optimizer.momentum!r}")
  if not c.two_stage.temperature > 0:
    _fail("two_stage.temperature", f"must be positive, got {c.two_stage.temperature!r}")
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
