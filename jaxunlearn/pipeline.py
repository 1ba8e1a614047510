"""The study end to end: train Original and Gold, unlearn, evaluate, report.

`train_and_evaluate(config, workdir)` is the one function `main.py` calls; it can
equally be driven from a notebook, with one's own arrays (`data=datasets.Dataset(...)`)
and one's own Flax model (`model=models.Model(module)` or a bare module, optionally
with `variables`) in place of what `config.data` and `config.model` name. Each stage
is checkpointed in the workdir and reused when the same command runs again.
"""
from __future__ import annotations

import os
import time
import zlib

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxunlearn import checkpoints, config as config_lib, datasets, distributed, evaluate, methods
from jaxunlearn import models, recipe as recipe_lib, report, saturation, scenario as scenario_lib
from jaxunlearn import scheduler
from jaxunlearn import search, sizes, train, workdir as workdir_lib


def build_model(config, data: datasets.Dataset, rng, own=None):
  """The configured architecture (`models.Model`) and its initial variables.

  `own`: the caller's (model, variables or None) instead of `config.model`'s; a bare
  Linen module is a stateless `Model`; without variables it is initialised from `rng`.
  """
  if own is None:
    return models.build(config, data.num_classes, data.train_images.shape[1:], rng)
  model, variables = train.as_model(own[0]), own[1]
  if variables is None:
    H, W, C = data.train_images.shape[1:]
    side = model.image_size
    variables = model.init(rng, (1, side or H, side or W, C))
  # One's own module: its outputs' shapes checked before any work, in one line.
  models.check_outputs(model, variables, data.train_images.shape[1:], data.num_classes)
  return model, dict(variables)


def own_inputs(data, own_model) -> dict:
  """What stands in a stage's inputs for config.data / config.model when the caller gives
  its own: a digest of the arrays, the module's definition (its repr: class and fields)
  and a digest of the given variables, so a workdir is never reused with other ones."""
  out = {}
  if data is not None:
    out["own_data"] = data.fingerprint()
  if own_model is not None:
    model, variables = own_model
    out["own_model"] = repr(train.as_model(model))
    if variables is not None:
      out["own_variables"] = datasets.digest(jax.tree.leaves(jax.device_get(variables)))
  return out


# Where each kind of task keeps its checkpoint (folder in the workdir) and its arrays' item name.
_ARTIFACTS = {"stage": ("checkpoints", "params"), "eval": ("eval", "outputs"),
              "tsne": ("tsne", "embedding")}


def _artifact(workdir: str, kind: str, name: str) -> tuple[str, str]:
  """(checkpoint folder, arrays item name) of task `kind`/`name`."""
  folder, arrays_name = _ARTIFACTS[kind]
  return os.path.join(workdir, folder, name), arrays_name


def stage_key(key: jax.Array, name: str) -> jax.Array:
  """A stage's random key, from its name: the same method gives the same result in any list."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _stage(trainer, workdir, abstract, name, variables, recipe, rng, inputs, config,
           bar_position=0):
  """Runs (or restores, or resumes) one training/unlearning stage; returns (variables, record).

  While it trains, its full state is saved to checkpoints/<name>.partial now and
  then (config.checkpoint_every_*), so a killed run resumes inside the stage. An
  unlearning method whose loss or parameters turn non-finite returns (None, a
  record saying where it diverged); an Original or Gold that diverges stops the run.
  """
  workdir_lib.check_lock()  # a run whose workdir lock was deleted stops here
  path, _ = _artifact(workdir, "stage", name)
  restored = checkpoints.restore(path, abstract, inputs=inputs)
  if restored is not None:
    logging.info("%s: restored from %s", name, workdir)
    checkpoints.remove(path + ".partial")
    return restored
  snapshots = checkpoints.Snapshots(
      path + ".partial", inputs, every_chunks=config.checkpoint_every_chunks,
      every_seconds=config.checkpoint_every_seconds)
  optimizers = {p.optimizer.name: p.optimizer for p in recipe.phases}
  resume = snapshots.latest(
      lambda names: trainer.snapshot_template(variables, {n: optimizers[n] for n in names}))
  if resume is not None:
    logging.info("%s: resuming at step %d", name, len(resume["loss"]))
  t0 = time.perf_counter()
  try:
    variables, log = trainer.run(variables, recipe, rng, desc=name, bar_position=bar_position,
                              snapshots=snapshots if jax.process_count() == 1 else None,
                              resume=resume)
  except train.Diverged as e:
    if name in methods.TRAINING:
      raise ValueError(f"{methods.TRAINING[name].DISPLAY_NAME} diverged ({e}); nothing to compare "
                       "against: lower config.train.learning_rate") from None
    logging.warning("%s diverged: %s", name, e)
    return None, {"diverged_step": e.step, "diverged_phase": e.phase,
                  "seconds": snapshots.seconds_before + time.perf_counter() - t0,
                  "compile_seconds": 0.0, "loss": []}
  variables = jax.block_until_ready(variables)
  seconds = snapshots.seconds_before + time.perf_counter() - t0 - log["compile_seconds"]
  record = {"inputs": inputs, "compile_seconds": log["compile_seconds"], "seconds": seconds,
            "loss": log["loss"]}
  checkpoints.save(path, len(log["loss"]), arrays=variables, record=record)
  checkpoints.remove(path + ".partial")
  return variables, record


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


def stage_recipe(config, name: str) -> recipe_lib.Recipe:
  """Stage `name`'s recipe, from its config section, with the section's batch size."""
  section = config[methods.section_name(name)]
  module = {**methods.TRAINING, **methods.METHODS}[name]
  return recipe_lib.with_batch_size(module.recipe(section), section.get("batch_size"))


def abstract_variables(trainer, variables):
  """Shapes, dtypes and the replicated sharding of `variables`: what a restore fills."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.replicated), variables)


def make_trainer(config, model, data: datasets.Dataset, scene) -> train.Trainer:
  """The run's `Trainer`: the data on the devices with the scenario's pools, the config's
  batch sizes, chunk size, normalisation and augmentation."""
  return train.Trainer(
      model, data, scene.pools(), batch_size=config.batch_size,
      steps_per_chunk=config.steps_per_chunk, eval_batch_size=config.eval.batch_size,
      progress=config.progress, augment=config.data.augment,
      **dict(zip(("mean", "std"), datasets.normalization(config.data, data.train_images.shape[-1]))))


def model_metrics(trainer, variables, scenario, gold_test_probs, seed):
  """Every metric of one model: (metrics, test probabilities, train features), on the host.

  `gold_test_probs` None: the model is Gold (its JSD to itself is 0). A model with
  non-finite outputs gets {"diverged_step": 0, "diverged_phase": ...} instead of metrics.
  """
  train_probs, train_feats, train_loss = trainer.predict(variables, "train", with_loss=True)
  test_probs, test_feats, test_loss = trainer.predict(variables, "test", with_loss=True)
  # Host arrays, as restored ones are, so `summarize` compiles once for all models.
  test_probs, train_probs = np.asarray(test_probs), np.asarray(train_probs)
  if not (np.isfinite(test_probs).all() and np.isfinite(train_probs).all()):
    return ({"diverged_step": 0, "diverged_phase": "evaluation (non-finite outputs)"},
            test_probs, np.asarray(train_feats))
  gold = test_probs if gold_test_probs is None else np.asarray(gold_test_probs)
  summary = evaluate.summarize(train_probs, trainer.train[1], test_probs, trainer.test[1],
                               gold, scenario.forget_train, scenario.forget_test)
  summary = {k: float(v) for k, v in jax.device_get(summary).items()
             if scenario.forget_test.any() or k not in evaluate.FORGET_TEST_METRICS}
  train_labels, test_labels = np.asarray(trainer.train[1]), np.asarray(trainer.test[1])
  summary.update(evaluate.privacy_metrics(
      scenario.forget_train, scenario.forget_test, train_probs, train_labels,
      test_probs, test_labels, np.asarray(train_feats), np.asarray(test_feats),
      train_loss_N=np.asarray(train_loss), test_loss_M=np.asarray(test_loss), seed=seed,
      class_wise=scenario.kind != "random"))
  return summary, test_probs, np.asarray(train_feats)


def _evaluate(trainer, workdir, name, variables, scenario, gold_test_probs, tsne_idx, inputs, seed):
  """Metrics of one model (checkpointed in workdir/eval), its test probabilities and t-SNE features."""
  path, arrays_name = _artifact(workdir, "eval", name)
  restored = checkpoints.restore(path, arrays_name=arrays_name, inputs=inputs)
  if restored is not None:
    outputs, record = restored
    feats = outputs.get("tsne_features")
    return (record["metrics"], np.asarray(outputs["test_probs"]),
            None if feats is None else np.asarray(feats))
  summary, test_probs, train_feats = model_metrics(trainer, variables, scenario,
                                                   gold_test_probs, seed)
  outputs = {"test_probs": test_probs}
  if len(tsne_idx):  # orbax cannot save an empty array
    outputs["tsne_features"] = train_feats[tsne_idx]
  checkpoints.save(path, 0, arrays=outputs, record={"inputs": inputs, "metrics": summary},
                   arrays_name=arrays_name)
  return summary, outputs["test_probs"], outputs.get("tsne_features")


def _tsne(workdir, name, features, config, threads: int | None, inputs) -> np.ndarray:
  """2-D t-SNE of one model's features (checkpointed in workdir/tsne/<name>).

  `threads` caps scikit-learn's OpenMP threads (per calling thread), so a t-SNE
  running beside a training stage takes one core rather than contending for all.
  """
  path, arrays_name = _artifact(workdir, "tsne", name)
  restored = checkpoints.restore(path, arrays_name=arrays_name, inputs=inputs)
  if restored is not None:
    return np.asarray(restored[0]["xy"])
  import threadpoolctl
  t0 = time.perf_counter()
  with threadpoolctl.threadpool_limits(limits=threads, user_api="openmp"):
    xy = report.tsne(features, config.tsne.perplexity, config.seed)
  checkpoints.save(path, 0, arrays={"xy": xy},
                   record={"inputs": inputs, "seconds": time.perf_counter() - t0},
                   arrays_name=arrays_name)
  return xy


def use_compilation_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at `path`, unless JAX already has one.

  Every compile over 0.2 s is kept (the steps, batch tables, evaluation; not the
  many tiny eager ones). JAX reads the setting at its first compilation.
  """
  if path and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       data: datasets.Dataset | None = None, model=None, variables=None) -> dict:
  """Runs the study, once or once per seed; returns the results also written to results.json.

  With `config.seeds`, each seed runs into workdir/seed_<n> (a finished seed is
  reused) and the workdir gets the summary: mean ± sd per model and metric, every
  seed's tables, and the trade-off figure. `data` (a `datasets.Dataset` of one's own
  arrays) replaces `config.data`'s source; `model` (a `models.Model` or a Linen module
  returning (logits, features)) and its `variables` (None: initialised per seed)
  replace `config.model`'s architecture. `config.data`'s normalisation and
  augmentation still apply. `config.tuned` (a tuning run's tuned.json) replaces the
  methods' settings with the tuned ones.
  """
  config_lib.validate(config)
  config = search.with_tuned(config)  # config.tuned's settings in the methods' sections
  use_compilation_cache(config.compilation_cache)
  if config.distributed:
    distributed.initialize(config.cluster)
    distributed.check_same_config(config, config.cluster.timeout_seconds)
  if data is None and model is None:  # the config's own sizes, before numpy or JAX allocate
    sizes.check_before_loading(config)
  own = None if model is None else (model, variables)
  seeds = config_lib.seed_list(config)
  if seeds is None:
    return _run_once(config, workdir, data=data, own=own, own_data=data is not None)
  # Check data and weights once, before anything is written.
  own_data = data is not None
  data = data if own_data else datasets.load(config.data)
  forgotten = _checked(config, data, own)[0].what
  with workdir_lib.claim(config, workdir) as config_dict:
    per_seed, names = {}, {}
    workdir_lib.record_config(workdir, config_dict)
    for s in seeds:
      c = config.copy_and_resolve_references()
      c.seed, c.seeds = s, ""
      print(f"=== seed {s} ({len(per_seed) + 1}/{len(seeds)})", flush=True)
      out = _run_once(c, os.path.join(workdir, f"seed_{s}"), data=data, own=own,
                      own_data=own_data)
      per_seed[s], names = out["models"], out["names"]
    figures = {"tradeoff.png": report.tradeoff_figure(per_seed, names, forgotten)}
    if jax.process_index() == 0:
      print(report.write_seeds(workdir, config_dict, per_seed, names, figures, forgotten))
  mean, std = report.aggregate(per_seed)
  return {"config": config_dict, "seeds": per_seed, "mean": mean, "std": std, "names": names}


def _checked(config, data: datasets.Dataset, own=None, rng=None):
  """(scenario, model, variables) once `config` is checked against the loaded `data`, its
  scenario made and its model built from `rng` (pretrained weights found, one's own
  outputs fit)."""
  datasets.check_config(config, data)
  scene = scenario_lib.from_config(config, data)
  rng = jax.random.key(0) if rng is None else rng
  return (scene, *build_model(config, data, rng, own))


def check_inputs(config: ml_collections.ConfigDict) -> str:
  """Every check a run makes before it writes anything, without running: the config
  validated, the data loaded and checked against it, the scenario and the model built.
  Returns what would run, in one line (the CLI's `--check_inputs`); raises as a run would."""
  config_lib.validate(config)
  config = search.with_tuned(config)
  sizes.check_before_loading(config)  # as train_and_evaluate: before numpy or JAX allocate
  data = datasets.load(config.data)
  scene, _, variables = _checked(config, data)
  return (f"{config.data.name}: {scene.describe()} / {len(data.test_labels):,} test examples, "
          f"{data.num_classes} classes; {config.model.name} with "
          f"{models.num_params(variables['params']):,} parameters; methods "
          f"{','.join(config_lib.method_names(config))}")


def _run_once(config: ml_collections.ConfigDict, workdir: str, data=None, own=None,
              own_data: bool = False) -> dict:
  """One run of the study with `config.seed` (validated): every stage, evaluation, table, figure.

  `data`: loaded already (`own_data`: the caller's arrays, not config.data's source);
  `own`: the caller's (model, variables) (`build_model`)."""
  data = data if data is not None else datasets.load(config.data)
  key = jax.random.key(config.seed)
  scene, model, init_variables = _checked(config, data, own, jax.random.fold_in(key, 0))
  extra = own_inputs(data if own_data else None, own)
  # Input checked, data and weights found: only now is anything written.
  with workdir_lib.claim(config, workdir) as config_dict:
    trainer = make_trainer(config, model, data, scene)
    logging.info("%s: %s / %d test examples; %s with %s parameters; %d device(s)",
                 "own arrays" if own_data else config.data.name, scene.describe(),
                 len(data.test_labels), config.model.name if own is None else "own model",
                 f"{models.num_params(init_variables['params']):,}", jax.device_count())
    study = _Study(config, workdir, trainer, scene, key, init_variables, extra)
    check_workdir(workdir, study.inputs)
    workdir_lib.record_config(workdir, config_dict)
    done = study.run()
    results = collect_results(done, study.stages)
    figures = study_figures(done, study.stages, study.names, scene, study.tsne_idx)
    if jax.process_index() == 0:
      print(report.write(workdir, config_dict, results, study.names, figures, scene.what))
    return {"config": config_dict, "models": results, "names": study.names}


def task_inputs(config, recipes: dict[str, recipe_lib.Recipe], tsne_idx, extra: dict) -> dict:
  """What each stage, evaluation and t-SNE ("stage/<name>", "eval/<name>", "tsne/<name>")
  is computed from: recorded in its checkpoint and checked when it is restored."""
  inputs = {}
  for m in recipes:  # the training stages first: a method's inputs hold Original's
    parent = None if m in methods.TRAINING else inputs["stage/original"]
    inputs[f"stage/{m}"] = workdir_lib.stage_inputs(config, methods.section_name(m), parent,
                                                    stage=m, pools=recipes[m].pools, **extra)
  for m in recipes:
    inputs[f"eval/{m}"] = {"model": inputs[f"stage/{m}"], "gold": inputs["stage/retrain"],
                           "tsne_examples": [int(i) for i in tsne_idx],
                           "metrics_version": evaluate.METRICS_VERSION}
    inputs[f"tsne/{m}"] = {"features": inputs[f"eval/{m}"], "tsne": config.tsne.to_dict()}
  return inputs


def check_workdir(workdir: str, inputs: dict) -> None:
  """Stops the run, before any work, at a checkpoint in `workdir` computed from something
  other than `inputs` (`task_inputs`) says."""
  for task, expected in inputs.items():
    path, arrays_name = _artifact(workdir, *task.split("/"))
    record = checkpoints.read_record(path, arrays_name=arrays_name)
    if record is not None:
      workdir_lib.check_inputs(path, record.get("inputs"), expected)


class _Study:
  """One seed's study as scheduler tasks: training stages, then each model's evaluation
  (the others' JSD needs Gold's) and t-SNE.

  Several tasks run at once on a multi-core CPU (`_workers`); the longest chain (Original,
  then its longest method) goes first. Results do not depend on the order: every stage
  has its own random key and checkpoint.
  """

  def __init__(self, config, workdir, trainer, scene, key, init_variables, extra: dict):
    self.config, self.workdir, self.trainer, self.scene = config, workdir, trainer, scene
    self.key, self.init_variables = key, init_variables
    self.abstract = abstract_variables(trainer, init_variables)
    self.method_names = config_lib.method_names(config)
    modules = {**methods.TRAINING, **{m: methods.METHODS[m] for m in self.method_names}}
    self.stages = list(modules)
    self.names = {m: module.DISPLAY_NAME for m, module in modules.items()}
    self.recipes = {m: stage_recipe(config, m) for m in modules}
    # Examples through the model in each stage: the scheduling priorities.
    self.cost = {m: sum(trainer.steps_in(p) * sum(trainer.stream_batch(s)
                                                 for s in p.streams.values())
                        for p in r.phases) for m, r in self.recipes.items()}
    self.tsne_idx = evaluate.tsne_indices(
        scene.forget_train, batch_size=config.batch_size, num_retain=config.tsne.num_retain,
        num_forget=config.tsne.num_forget, seed=config.seed)
    self.inputs = task_inputs(config, self.recipes, self.tsne_idx, extra)
    self.workers = _workers(config)
    self.bars = scheduler.BarSlots()

  def run(self) -> dict:
    """Every task's result by task name (`scheduler.run_tasks`)."""
    tasks = {name: self._stage_task(name) for name in self.stages}
    tasks.update({f"eval/{name}": self._eval_task(name) for name in self.stages})
    if len(self.tsne_idx):
      tasks.update({f"tsne/{name}": self._tsne_task(name) for name in self.stages})
    import threadpoolctl  # scikit-learn's dependency
    # numpy's BLAS (t-SNE's PCA) one thread per task while tasks share the cores: its
    # threads spin-wait beside XLA's. Process-wide, so set here once, not per task.
    with threadpoolctl.threadpool_limits(limits=1 if self.workers > 1 else None, user_api="blas"):
      return scheduler.run_tasks(tasks, self.workers, self.trainer.cancel)

  def _stage_task(self, name: str) -> scheduler.Task:
    parent = None if name in methods.TRAINING else "original"

    def fn(results, idle):
      start = self.init_variables if parent is None else results[parent][0]
      with self.bars.take() as slot:
        return _stage(self.trainer, self.workdir, self.abstract, name, start, self.recipes[name],
                      stage_key(self.key, name), self.inputs[f"stage/{name}"], self.config,
                      bar_position=slot)
    longest_method = max([self.cost[m] for m in self.method_names] or [0])
    priority = self.cost[name] + (longest_method if name == "original" else 0)
    return scheduler.Task(fn, deps=() if parent is None else (parent,), priority=priority)

  def _eval_task(self, name: str) -> scheduler.Task:
    def fn(results, idle):
      if results[name][0] is None:  # diverged: nothing to evaluate
        return {k: results[name][1][k] for k in ("diverged_step", "diverged_phase")}, None, None
      gold = None if name == "retrain" else results["eval/retrain"][1]
      return _evaluate(self.trainer, self.workdir, name, results[name][0], self.scene, gold,
                       self.tsne_idx, self.inputs[f"eval/{name}"], self.config.seed)
    return scheduler.Task(fn, deps=(name,) if name == "retrain" else (name, "eval/retrain"),
                          priority=-1)

  def _tsne_task(self, name: str) -> scheduler.Task:
    def fn(results, idle):
      if results[f"eval/{name}"][2] is None:
        return None
      return _tsne(self.workdir, name, results[f"eval/{name}"][2], self.config,
                   threads=None if self.workers == 1 else 1 + idle,
                   inputs=self.inputs[f"tsne/{name}"])
    return scheduler.Task(fn, deps=(f"eval/{name}",), priority=-2)


def collect_results(done: dict, stages: list[str]) -> dict[str, dict]:
  """Each model's metrics, run time, gaps to Gold and saturation marks, from the tasks' results."""
  results = {}
  for name in stages:
    record = done[name][1]
    results[name] = dict(done[f"eval/{name}"][0], seconds=record["seconds"],
                         compile_seconds=record["compile_seconds"])
  for name in stages:
    if "diverged_step" not in results[name]:
      results[name].update(evaluate.gaps_to_gold(results[name], results["retrain"]))
      # One class for every input, or a loss that stopped changing: marked, as divergence is.
      results[name].update(saturation.check(done[f"eval/{name}"][1], done[name][1]["loss"]))
  return results


def study_figures(done: dict, stages: list[str], names: dict[str, str], scene,
                  tsne_idx) -> dict[str, bytes]:
  """The loss curves and (when examples were picked for it) the t-SNE figure, as PNG bytes."""
  figures = {"loss_curves.png": report.loss_figure({m: done[m][1]["loss"] for m in stages},
                                                   names, scene.what)}
  if len(tsne_idx):
    figures["tsne.png"] = report.tsne_figure(
        {m: done[f"tsne/{m}"] for m in stages if done[f"tsne/{m}"] is not None},
        scene.forget_train[tsne_idx], names, scene.what)
  return figures
