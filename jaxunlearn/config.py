"""The base config every experiment derives from, and its validation.

Experiment files in `configs/` call `get_base_config()`, override what differs
and return it. `validate` runs before any work and stops on the first bad field
with a one-line error that names it and what is allowed.
"""
from __future__ import annotations

import os
import re

import ml_collections

from jaxunlearn import augment, datasets, models, optimizers, search
from jaxunlearn.methods import METHODS
from jaxunlearn.fields import (check_bool, check_choice, check_float, check_int, check_optimizer,
                               check_str, closest, fail, field_names, field_value, listed,
                               names)


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Seed of parameter initialisation, shuffling, the random forget subset and t-SNE
  # subset selection (a single run, in the workdir itself).
  c.seed = 42
  # Several runs, one per seed, each in workdir/seed_<n>, summarised as mean ± sd:
  # comma-separated seeds ("0,1,2") or a count ("5" = seeds 0..4). "" runs `seed` alone.
  c.seeds = ""
  # Which training examples are forgotten: "class" (every example of `forget_class`),
  # "random" (a seeded, stratified `forget_fraction` of the training set) or "subclass"
  # (every example of the fine class `forget_subclass`, training on coarse labels).
  c.scenario = "class"
  # scenario "class": the class(es) whose training examples form the forget set ("0", "0,3").
  c.forget_class = "0"
  # scenario "random": the forgotten fraction of the training set, stratified by class.
  c.forget_fraction = 0.1
  # scenario "subclass": the fine class forgotten, by name ("rocket") or number, inside its
  # coarse class; needs coarse labels with fine ones (data.label "coarse": cifar100 as
  # CIFAR-20, or digits paired into 5 classes).
  c.forget_subclass = ""

  c.data = ml_collections.ConfigDict()
  # Data set: "digits" (scikit-learn, offline), "synthetic" (random images and labels, for
  # benchmarks and hardware checks), "folder" (your own images, `folder` below) or the TFDS
  # name of any image-classification data set ("cifar10", "cifar100", "svhn_cropped",
  # "mnist", "fashion_mnist", ...; prepared once, see jaxunlearn/tfds_data.py). Classes,
  # their names, image size and channels come from the data set itself.
  c.data.name = "digits"
  # TFDS data sets: the class label to learn; "" is the data set's own (CIFAR-100: its 100
  # fine classes), else a class-label feature ("coarse_label"); cifar100 also takes "fine"
  # and "coarse" (its 20 super-classes: CIFAR-20).
  c.data.label = ""
  # name "folder": the folder holding train/<class>/* and test/<class>/* images (png, jpg,
  # ...); the classes are the subfolder names, sorted.
  c.data.folder = ml_collections.FieldReference(None, field_type=str)
  # Pixels per side every image is resized to when loaded (bilinear, as torchvision's
  # Resize on PIL images; aspect ratio not kept); 0 keeps the stored size, which must
  # then be the same for all images.
  c.data.image_size = 0
  # Per-channel normalisation of pixels in [0, 1] into model input, (x - mean) / std: one
  # number for every channel ("0.5", the study's) or one per channel, comma-separated
  # (CIFAR-10's "0.4914,0.4822,0.4465" and "0.2470,0.2435,0.2616").
  c.data.mean = "0.5"
  c.data.std = "0.5"
  # Training-time augmentation: "none" or "crop_flip" (the references' random crop of
  # the image padded by 4 black pixels, then a random horizontal flip).
  c.data.augment = "none"
  # digits only: fraction of examples held out as the test set (stratified).
  c.data.test_size = 0.25
  # random_state of digits' stratified train/test split and of `hold_out`'s split.
  c.data.split_seed = 0
  # Fraction of the training set left out of every stage (stratified by class, seeded by
  # split_seed), as the references keep it for validation: 0.1 trains CIFAR-10 on 45,000
  # images as Unlearn-Sparse does. 0 trains on all of it.
  c.data.hold_out = 0.0
  # Tuning (`tune` below) only: the fraction of the training set split off first
  # (stratified, by tune.seed) as validation data, which plays the test set's part
  # in every trial; the test set is never seen while tuning.
  c.data.validation_fraction = 0.1
  # TFDS data sets only: tfds data_dir (None: tfds' default, ~/tensorflow_datasets).
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  # TFDS data sets only: folder holding the data set's manually downloaded archives
  # (cifar10: cifar-10-binary.tar.gz), for preparing offline.
  c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
  # TFDS data sets only: prepare the data set when it is missing (needs TensorFlow + network).
  c.data.prepare = False

  # synthetic only: sizes of the random data set (CIFAR-10's by default): training and
  # test images (at least 2 and 1: a forget and a retain example), pixels per side.
  c.data.synthetic = ml_collections.ConfigDict(dict(num_train=50_000, num_test=10_000, image_size=32))

  # The architecture (`jaxunlearn/models/`): name, dtype, weights, one section each.
  c.model = models.get_config()

  # Examples per optimizer step, in total over all devices (every stage).
  c.batch_size = 64

  # Original (all training data) and Gold (retrain on the retain set only): the same
  # recipe, from the same initialisation (or pretrained weights). The study's SGD.
  # Every training section has the optimizer fields of `optimizers.section_fields`
  # (SGD, Adam or AdamW as PyTorch's; constant, cosine or step schedule; warm-up).
  c.train = ml_collections.ConfigDict(optimizers.section_fields(learning_rate=1e-4, epochs=3))

  # Unlearning methods to run, comma-separated ("finetune,salun" or "all"); each
  # starts from the Original. Every method's section below holds its hyperparameters,
  # defaults from its reference code (see jaxunlearn/methods/<name>.py).
  c.methods = "finetune,gradient_ascent,two_stage"
  for name, module in METHODS.items():
    c[name] = module.get_config()

  # Tuning every method against Gold before comparing (`jaxunlearn/tune.py`): with
  # `methods` set, a run searches each method's hyperparameters (its SEARCH_SPACE) on
  # held-out data, then runs the tuned methods on `seeds` into <workdir>/eval.
  c.tune = ml_collections.ConfigDict(dict(
      methods="",  # methods to tune, comma-separated, or "all"; "" runs the study untuned
      trials=20,  # trials per method (Optuna's; the same budget for every method)
      objective="avg_gap",  # minimised "avg_gap" or "gap_<metric>", or maximised "tow"
      sampler="tpe",  # "tpe" (Optuna's TPE, seeded) or "random"
      seed=1000,  # the tuning seed: its Original, Gold, validation split and sampler
      minutes=0.0,  # time budget per method (0: none); stops after the running trial
      # Narrow or fix the declared spaces: "scrub.alpha=1e-3:1e-1,salun.mask_fraction=0.5".
      space="",
  ))
  # A tuned.json (written by a tuning run) whose settings replace the methods' own.
  c.tuned = ml_collections.FieldReference(None, field_type=str)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512  # examples per evaluation forward pass, in total

  c.tsne = ml_collections.ConfigDict()
  # Whole shuffled training batches are taken until at least this many examples
  # of each kind are collected; the same images go through every model.
  c.tsne.num_retain = 300
  c.tsne.num_forget = 300
  # scikit-learn's perplexity (> 0), lowered to (points - 1) / 3 when there are too few
  # points for it (scikit-learn needs it below the number of points).
  c.tsne.perplexity = 30.0

  # A training stage saves its full state (parameters, optimizer, position) this
  # often, so a killed run resumes inside the stage; 0 turns a criterion off. Only
  # the latest is kept, and it is deleted once the stage has finished.
  c.checkpoint_every_seconds = 30.0
  c.checkpoint_every_chunks = 0
  # Training steps run as one compiled call (lax.scan); the progress bar moves per chunk.
  # Snapshots record the step, so a run may resume with another chunk size.
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


def from_file(path: str) -> ml_collections.ConfigDict:
  """The config of another config file (`get_config()`), for a file that derives from it:
  `from_file(os.path.join(os.path.dirname(__file__), "digits.py"))`."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def seed_list(c) -> tuple[int, ...] | None:
  """The seeds of a multi-seed run, or None for a single run of `seed`."""
  parts = names(c.seeds)
  if not parts:
    return None
  values = tuple(int(p) for p in parts)
  return tuple(range(values[0])) if len(values) == 1 else values


def method_names(c) -> tuple[str, ...]:
  m = names(c.methods)
  return tuple(METHODS) if m == ("all",) else m


# At most this many seeds from a count ("5"): each seed is a whole run.
MAX_SEEDS = 1000


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks every field of `c`; raises a one-line ValueError naming the first bad one.

  Every field is checked, also those the run at hand ignores (another data set's,
  a method not in `methods`): a config is valid or not whatever it runs. Only what
  needs the data or weights themselves (the forget set is not empty, the weights'
  sizes) is checked when they are loaded, still before anything is written.
  """
  _check_known_fields(c)
  _check_data(c)
  _check_seeds(c)
  _check_scenario(c)
  # The class count is the data set's own: range checks that need it run once it is
  # loaded (`datasets.check_config`), still before anything is written.
  models.validate(c, None)
  _check_methods(c)
  _check_run(c)
  _check_cluster(c)


def _check_known_fields(c) -> None:
  """Every field is the base config's, and none of them is missing."""
  # The fields are the base config's: a misspelt field set in a config file (before it
  # is locked) would otherwise be a field nothing reads.
  base = field_names(get_base_config())
  have = field_names(c)
  for field in have:
    if field not in base:
      near = ", ".join(f"config.{n}" for n in closest(field, base))
      fail(field, f"unknown field; closest: {near}")
  for field in base:
    if field not in have:
      fail(field, "missing; start from config.get_base_config() and change fields")


def _check_data(c) -> None:
  """config.data: source, labels, image size, normalisation, augmentation, splits."""
  check_str(c, "data.name")
  datasets.check_name(c.data.name)
  check_str(c, "data.label")
  if not re.fullmatch(r"[A-Za-z0-9_]*", c.data.label):
    fail("data.label", f"must be \"\" (the data set's own label) or the name of a class-label "
         f"feature, e.g. \"coarse_label\" or \"coarse\" (cifar100); got {c.data.label!r}")
  check_str(c, "data.folder", "a folder path", optional=True)
  if c.data.name == "folder" and not c.data.folder:
    fail("data.folder", "is not set; name the folder holding train/<class>/ and test/<class>/")
  if c.data.folder and c.data.name != "folder":
    fail("data.folder", f"is set but data.name is {c.data.name!r}; set data.name=folder to "
         "read the folder, or leave data.folder unset")
  check_int(c, "data.image_size", 0)
  datasets.normalization(c.data)
  check_choice(c, "data.augment", augment.KINDS)
  check_float(c, "data.test_size", 0, 1, open_low=True)
  check_int(c, "data.split_seed", 0)
  check_float(c, "data.hold_out", 0, 1, open_high=True)
  check_str(c, "data.data_dir", "a folder path", optional=True)
  check_str(c, "data.manual_dir", "a folder path", optional=True)
  check_bool(c, "data.prepare")
  check_int(c, "data.synthetic.num_train", 2)  # a forget and a retain example
  check_int(c, "data.synthetic.num_test")
  check_int(c, "data.synthetic.image_size")


def _check_seeds(c) -> None:
  """config.seed and config.seeds."""
  check_int(c, "seed", 0)
  check_str(c, "seeds", "a comma-separated string of seeds or a count")
  listed(c, "seeds")
  try:
    parts = [int(p) for p in names(c.seeds)]
  except ValueError:
    fail("seeds", f"must be comma-separated integers (\"0,1,2\") or a count (\"5\"), "
          f"got {c.seeds!r}")
  count = len(parts) == 1 and 1 <= parts[0] <= MAX_SEEDS
  seeds = len(parts) > 1 and all(0 <= s < 2 ** 31 for s in parts) and len(set(parts)) == len(parts)
  if parts and not (count or seeds):
    fail("seeds", f"must name distinct seeds in [0, 2**31) or a count in 1..{MAX_SEEDS}, "
          f"got {c.seeds!r}")


def _check_scenario(c) -> None:
  """What is forgotten: the scenario and its class, sub-class or fraction."""
  check_str(c, "scenario")
  check_choice(c, "scenario", ("class", "random", "subclass"))
  check_str(c, "forget_subclass", "a fine class name or number")
  if "," in c.forget_subclass:
    fail("forget_subclass", f"names one fine class; got {c.forget_subclass!r}")
  if c.scenario == "subclass" and not c.forget_subclass.strip():
    fail("forget_subclass", "is empty; scenario \"subclass\" needs the fine class to forget, "
         "e.g. --config.forget_subclass=rocket")
  check_str(c, "forget_class", "a string of class numbers")
  listed(c, "forget_class")
  try:
    classes = [int(v) for v in names(c.forget_class)]
  except ValueError:
    fail("forget_class", f"must be class numbers, e.g. \"3\" or \"0,3\"; got {c.forget_class!r}")
  if not classes:
    fail("forget_class", "is empty; name at least one class")
  if len(set(classes)) != len(classes):
    fail("forget_class", f"lists a class twice: {c.forget_class!r}")
  for k in classes:  # the upper bound is the data set's (`datasets.check_config`)
    if k < 0:
      fail("forget_class", f"{k} is out of range; classes are numbered from 0")
  check_float(c, "forget_fraction", 0, 1, open_low=True)


def _check_methods(c) -> None:
  """Batch size, the training optimizer, the methods and their sections, tuning."""
  check_int(c, "batch_size")
  check_optimizer(c, "train")
  check_str(c, "methods", "a comma-separated string")
  listed(c, "methods")
  methods = method_names(c)
  if not methods:
    fail("methods", f"is empty; allowed: any of {', '.join(METHODS)}, or all")
  for m in methods:
    if m not in METHODS:
      fail("methods", f"unknown method {m!r}; allowed: {', '.join(METHODS)}, or all")
  if len(set(methods)) != len(methods):
    fail("methods", f"lists a method twice: {','.join(methods)}")
  for m, module in METHODS.items():  # every section, also of methods not run
    module.validate(c, m)

  search.validate(c)
  listed(c, "tune.methods")
  if search.method_list(c) and c.tune.seed in (seed_list(c) or (c.seed,)):
    fail("tune.seed", f"{c.tune.seed} is also an evaluation seed; tuned settings are judged on "
         "models they were not chosen on: pick a seed outside config.seeds / config.seed")


def _check_run(c) -> None:
  """Evaluation, t-SNE, checkpointing, progress and the compilation cache."""
  check_int(c, "eval.batch_size")
  check_int(c, "tsne.num_retain", 0)
  check_int(c, "tsne.num_forget", 0)
  check_float(c, "tsne.perplexity", 0, open_low=True)
  if 0 < c.tsne.num_retain + c.tsne.num_forget < 2 and c.batch_size < 2:
    # Whole batches are taken: fewer than 2 points only at batch size 1.
    fail("tsne.num_retain", "t-SNE needs 2 points or more: with batch_size 1 set "
          "num_retain + num_forget >= 2 (both 0 skip it)")
  check_float(c, "checkpoint_every_seconds", 0)
  check_int(c, "checkpoint_every_chunks", 0)
  check_int(c, "steps_per_chunk")
  check_bool(c, "progress")
  check_bool(c, "concurrent_stages")
  check_str(c, "compilation_cache", 'a folder path or "" (off)')


def _check_cluster(c) -> None:
  """Multi-process settings."""
  check_bool(c, "distributed")
  check_str(c, "cluster.coordinator_address")
  address = c.cluster.coordinator_address
  host, _, port = address.rpartition(":")
  if address and not (host and re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 2 ** 16):
    fail("cluster.coordinator_address", f"must be host:port (\"\": from the environment), "
          f"got {address!r}")
  check_int(c, "cluster.num_processes", 0)
  check_int(c, "cluster.process_id", -1)
  if 0 < c.cluster.num_processes <= c.cluster.process_id:
    fail("cluster.process_id", f"must be below num_processes {c.cluster.num_processes}, "
          f"got {c.cluster.process_id}")
  check_int(c, "cluster.timeout_seconds")
