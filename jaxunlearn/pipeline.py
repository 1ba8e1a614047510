"""The study end to end: train Original and Gold, unlearn, evaluate, report.

`train_and_evaluate(config, workdir)` is the one function `main.py` calls; it can
equally be driven from a notebook. Each stage is checkpointed in the workdir and
reused when the same command runs again.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxunlearn import checkpoints, config as config_lib, datasets, evaluate, methods
from jaxunlearn import model as model_lib, objectives, report, train

# Fields that change how fast a run goes or what it shows, not what it computes.
_NON_RESULT_FIELDS = ("progress", "steps_per_chunk", "eval.batch_size", "concurrent_stages",
                      "compilation_cache")

DISPLAY_NAMES = {"original": "Original", "gold": "Gold Standard"}


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Checks the workdir is writable and holds no run of a different config; records this one."""
  config_dict = json.loads(config.to_json())
  try:
    os.makedirs(workdir, exist_ok=True)
    report.atomic_write(os.path.join(workdir, ".write_test"), "")
    os.remove(os.path.join(workdir, ".write_test"))
  except OSError as e:
    raise ValueError(f"--workdir: cannot write to {workdir!r} ({e.strerror}); "
                     "choose a writable folder") from None
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = _flat(json.load(f))
    new = _flat(config_dict)
    diff = sorted(k for k in old.keys() | new.keys()
                  if k not in _NON_RESULT_FIELDS and old.get(k) != new.get(k))
    if diff:
      k = diff[0]
      raise ValueError(f"--workdir {workdir!r} holds a run with a different config "
                       f"({', '.join(diff)}; e.g. {k}: {old.get(k)!r} there, {new.get(k)!r} now); "
                       "use a new --workdir to keep both")
  elif jax.process_index() == 0:  # multi-host: one writer
    report.atomic_write(path, json.dumps(config_dict, indent=2))
  return config_dict


def build_model(config, data: datasets.Dataset, rng):
  """The ViT and its initial parameters: pretrained (head re-initialised) or random."""
  dtype = config_lib.DTYPES[config.model.dtype]
  if not config.model.init:
    vit = model_lib.create(config.model, data.num_classes, dtype)
    return vit, model_lib.init_params(vit, rng, data.train_images.shape[-1])
  from jaxunlearn import weights
  kwargs, params = weights.load_pretrained(config.model.init, num_classes=data.num_classes,
                                           rng=rng, image_size=config.model.image_size)
  if config.model.variant:
    want = model_lib.VARIANTS[config.model.variant]
    got = {k: kwargs[k] for k in want}
    if got != want:
      raise ValueError(f"config.model.variant: {config.model.variant} is {want}, but "
                       f"{config.model.init} holds {got}; set variant to \"\" or match the weights")
  channels = params["patch_embed"]["kernel"].shape[2]
  if channels != data.train_images.shape[-1]:
    raise ValueError(f"config.model.init: the weights take {channels}-channel images, "
                     f"{config.data.name} has {data.train_images.shape[-1]}")
  return model_lib.ViT(**kwargs, dtype=dtype), params


class _BarSlots:
  """Progress-bar lines for stages running at once: each takes the lowest free line."""

  def __init__(self):
    self._lock, self._used = threading.Lock(), set()

  @contextlib.contextmanager
  def take(self):
    with self._lock:
      slot = min(set(range(len(self._used) + 1)) - self._used)
      self._used.add(slot)
    try:
      yield slot
    finally:
      with self._lock:
        self._used.discard(slot)


def _stage(trainer, workdir, abstract, name, params, phases, rng, learning_rate, bar_position=0):
  """Runs (or restores) one training/unlearning stage; returns (params, seconds)."""
  path = os.path.join(workdir, "checkpoints", name)
  restored = checkpoints.restore(path, abstract)
  if restored is not None:
    logging.info("%s: restored from %s", name, workdir)
    return restored[0], restored[1]["seconds"]
  t0 = time.perf_counter()
  params, log = trainer.run(params, phases, rng, desc=name, learning_rate=learning_rate,
                            bar_position=bar_position)
  params = jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  checkpoints.save(path, len(log["loss"]), arrays=params,
                   record={"seconds": seconds, "loss": log["loss"]})
  return params, seconds


def _workers(config) -> int:
  """How many pipeline tasks run at once: one per CPU core, or one.

  Only for one process on the CPU: on accelerators a stage already fills the device,
  and collectives of concurrent programs could interleave differently across hosts.
  """
  if (config.concurrent_stages and jax.default_backend() == "cpu"
      and jax.process_count() == 1):
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)
  return 1


@dataclasses.dataclass(frozen=True)
class _Task:
  """One step of the pipeline: `fn(results, idle)` once every task in `deps` is done.

  `results` maps finished tasks to their values; `idle` is how many workers had
  nothing to do when the task started.
  """
  fn: Callable[[dict, int], Any]
  deps: tuple[str, ...] = ()
  priority: float = 0.0  # among ready tasks, the highest starts first


def _run_tasks(tasks: dict[str, _Task], workers: int, cancel: threading.Event) -> dict:
  """Runs `tasks` on `workers` threads, each as soon as its deps are done (list scheduling).

  Returns {name: value}. On a failure or Ctrl-C, `cancel` is set, so running
  training stages stop at their next chunk, and the first error is re-raised once
  the running tasks have returned; finished stages keep their checkpoints.
  """
  results, waiting, running = {}, dict(tasks), {}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    try:
      while waiting or running:
        ready = [n for n, t in waiting.items() if all(d in results for d in t.deps)]
        ready.sort(key=lambda n: -waiting[n].priority)  # stable: ties keep their order
        for name in ready[:workers - len(running)]:
          idle = workers - len(running) - 1
          running[pool.submit(waiting.pop(name).fn, dict(results), idle)] = name
        if not running:
          raise ValueError(f"tasks {sorted(waiting)} wait on tasks that do not exist")
        done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
          results[running.pop(f)] = f.result()  # re-raises a task's error
    except BaseException:
      cancel.set()
      raise
  return results


def _evaluate(trainer, workdir, name, params, data, forget_class, gold_test_probs, tsne_idx):
  """Metrics of one model (checkpointed in workdir/eval), its test probabilities and t-SNE features."""
  path = os.path.join(workdir, "eval", name)
  restored = checkpoints.restore(path, arrays_name="outputs")
  if restored is not None:
    outputs, summary = restored
    feats = outputs.get("tsne_features")
    return summary, np.asarray(outputs["test_probs"]), None if feats is None else np.asarray(feats)
  train_probs, train_feats = trainer.predict(params, "train")
  test_probs, _ = trainer.predict(params, "test")
  # Host arrays, as restored ones are, so `summarize` compiles once for all models.
  test_probs = np.asarray(test_probs)
  gold = test_probs if gold_test_probs is None else np.asarray(gold_test_probs)
  summary = evaluate.summarize(train_probs, trainer.train[1], test_probs, trainer.test[1],
                               gold, forget_class=forget_class)
  summary = {k: float(v) for k, v in jax.device_get(summary).items()}
  outputs = {"test_probs": test_probs}
  if len(tsne_idx):  # orbax cannot save an empty array
    outputs["tsne_features"] = np.asarray(train_feats)[tsne_idx]
  checkpoints.save(path, 0, arrays=outputs, record=summary, arrays_name="outputs")
  return summary, outputs["test_probs"], outputs.get("tsne_features")


def _tsne(workdir, name, features, config, threads: int | None) -> np.ndarray:
  """2-D t-SNE of one model's features (checkpointed in workdir/tsne/<name>).

  `threads` caps scikit-learn's OpenMP threads (per calling thread), so a t-SNE
  running beside a training stage takes one core rather than contending for all.
  """
  path = os.path.join(workdir, "tsne", name)
  restored = checkpoints.restore(path, arrays_name="embedding")
  if restored is not None:
    return np.asarray(restored[0]["xy"])
  import threadpoolctl
  t0 = time.perf_counter()
  with threadpoolctl.threadpool_limits(limits=threads, user_api="openmp"):
    xy = report.tsne(features, config.tsne.perplexity, config.seed)
  checkpoints.save(path, 0, arrays={"xy": xy}, record={"seconds": time.perf_counter() - t0},
                   arrays_name="embedding")
  return xy


def use_compilation_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at `path`, unless JAX already has one.

  Every compile over 0.2 s is kept (the steps, batch tables, evaluation; not the
  many tiny eager ones). JAX reads the setting at its first compilation.
  """
  if path and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the whole study; returns the results dict also written to results.json."""
  config_lib.validate(config)
  use_compilation_cache(config.compilation_cache)
  if config.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  config_dict = prepare_workdir(config, workdir)
  data = datasets.load(config.data)
  fc = config.forget_class
  key = jax.random.key(config.seed)
  vit, init_params = build_model(config, data, jax.random.fold_in(key, 0))
  trainer = train.Trainer(
      vit, data, fc, batch_size=config.batch_size,
      momentum=config.optimizer.momentum, steps_per_chunk=config.steps_per_chunk,
      eval_batch_size=config.eval.batch_size, progress=config.progress)
  logging.info("%s: %d train (%d forget) / %d test examples; ViT with %s parameters; %d device(s)",
               config.data.name, len(data.train_labels), int(np.sum(data.train_labels == fc)),
               len(data.test_labels), f"{model_lib.num_params(init_params):,}", jax.device_count())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.replicated), init_params)

  def supervised(pool):
    return [train.Phase("train", objectives.cross_entropy,
                        {"data": train.Stream(pool, epochs=config.train_epochs)})]

  train_lr, unlearn_lr = config.optimizer.learning_rate, config.optimizer.unlearn_learning_rate
  method_names = (config.methods,) if isinstance(config.methods, str) else tuple(config.methods)
  names = dict(DISPLAY_NAMES, **{m: methods.METHODS[m].DISPLAY_NAME for m in method_names})
  tsne_idx = evaluate.tsne_indices(
      data.train_labels, fc, batch_size=config.batch_size, num_retain=config.tsne.num_retain,
      num_forget=config.tsne.num_forget, seed=config.seed)
  workers = _workers(config)

  # The study as tasks with dependencies: training stages, then each model's evaluation
  # (the others' JSD needs Gold's) and t-SNE. Several run at once on a multi-core CPU;
  # the longest chain (Original, then its longest method) goes first. Results do not
  # depend on the order: every stage has its own random key and checkpoint.
  stages = {
      "original": (None, supervised("all"), jax.random.fold_in(key, 1), train_lr),
      "gold": (None, supervised("retain"), jax.random.fold_in(key, 2), train_lr),
      **{m: ("original", methods.METHODS[m].phases(config), jax.random.fold_in(key, 100 + i),
             unlearn_lr) for i, m in enumerate(method_names)}}
  cost = {name: sum(trainer.steps_in(p) * len(p.streams) for p in phases)
          for name, (_, phases, _, _) in stages.items()}
  longest_method = max(cost[m] for m in method_names)
  bars = _BarSlots()

  def stage_task(name, parent, phases, rng, lr):
    def fn(results, idle):
      start = init_params if parent is None else results[parent][0]
      with bars.take() as slot:
        return _stage(trainer, workdir, abstract, name, start, phases, rng, lr, bar_position=slot)
    priority = cost[name] + (longest_method if name == "original" else 0)
    return _Task(fn, deps=() if parent is None else (parent,), priority=priority)

  def eval_task(name):
    def fn(results, idle):
      gold = None if name == "gold" else results["eval/gold"][1]
      return _evaluate(trainer, workdir, name, results[name][0], data, fc, gold, tsne_idx)
    return _Task(fn, deps=(name,) if name == "gold" else (name, "eval/gold"), priority=-1)

  def tsne_task(name):
    def fn(results, idle):
      return _tsne(workdir, name, results[f"eval/{name}"][2], config,
                   threads=None if workers == 1 else 1 + idle)
    return _Task(fn, deps=(f"eval/{name}",), priority=-2)

  models = ["original", "gold", *method_names]
  tasks = {name: stage_task(name, *stages[name]) for name in models}
  tasks.update({f"eval/{name}": eval_task(name) for name in models})
  if len(tsne_idx):
    tasks.update({f"tsne/{name}": tsne_task(name) for name in models})
  import threadpoolctl  # scikit-learn's dependency
  # numpy's BLAS (t-SNE's PCA) one thread per task while tasks share the cores: its
  # threads spin-wait beside XLA's. Process-wide, so set here once, not per task.
  with threadpoolctl.threadpool_limits(limits=1 if workers > 1 else None, user_api="blas"):
    done = _run_tasks(tasks, workers, trainer.cancel)

  results = {}
  for name in models:
    results[name] = done[f"eval/{name}"][0]
    results[name]["seconds"] = done[name][1]
  png = None
  if len(tsne_idx):
    is_forget = data.train_labels[tsne_idx] == fc
    png = report.tsne_figure({m: done[f"tsne/{m}"] for m in models}, is_forget, names)
  if jax.process_index() == 0:
    print(report.write(workdir, config_dict, results, names, png))
  return {"config": config_dict, "models": results}
