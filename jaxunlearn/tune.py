"""Tuning every method against Gold before comparing: a search on held-out data, then the tables.

`run(config, workdir)` (what `main.py` calls when `config.tune.methods` is set):

1. The tuning seed (`tune.seed`, never an evaluation seed): a stratified
   `data.validation_fraction` of the training set is split off first and plays
   the test set's part (test accuracy, MIA non-members, JSD); Original and Gold
   are trained once on the rest (checkpointed in <workdir>/search) and reused
   by every trial.
2. Each method: `tune.trials` Optuna trials (TPE, seeded) over its search
   space (`search.space`), each an unlearning run from that Original judged by
   `tune.objective` against that Gold. Optuna's SQLite storage in
   <workdir>/tuning/optuna.db: a killed search resumes, a finished one is reused.
   Hyperparameters are traced inputs of the compiled step, so only a method's
   first trial compiles (epochs change the number of chunks).
3. tuning.md / tuning.json / figures, and tuned.json; then the tuned methods on
   the evaluation seeds (`seeds`) into <workdir>/eval, with the usual tables.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from jaxunlearn import datasets, evaluate, methods, pipeline
from jaxunlearn import scenario as scenario_lib, search, train, workdir as workdir_lib

# The objective's value for a method whose run diverged: the worst there is.
_WORST = {"tow": 0.0}
_WORST_GAP = 100.0


def held_out(data: datasets.Dataset, fraction: float, seed: int) -> datasets.Dataset:
  """The data set with a stratified `fraction` of its training set as its test set (validation)."""
  keep, val = datasets.stratified_split(datasets.finest_labels(data), fraction, seed,
                                        "data.validation_fraction")
  fine = data.train_fine_labels
  return dataclasses.replace(
      datasets.train_subset(data, keep), test_images=data.train_images[val],
      test_labels=data.train_labels[val], test_fine_labels=None if fine is None else fine[val])


def maximize(objective: str) -> bool:
  return objective == "tow"


def objective_value(metrics: dict, objective: str) -> float:
  """The trial's objective; the worst value for a diverged model."""
  if "diverged_step" in metrics:
    return _WORST.get(objective, _WORST_GAP)
  return float(metrics[objective])


class Search:
  """The tuning seed's held-out data, its Original and Gold (trained once), and trials on them."""

  def __init__(self, config):
    """Loads and splits the data, builds the model and trainer: nothing is written yet."""
    c = config.copy_and_resolve_references()
    c.seed, c.seeds = config.tune.seed, ""
    self.config = c
    data = held_out(datasets.load(c.data), c.data.validation_fraction, c.seed)
    datasets.check_config(c, data)
    self.scene = scenario_lib.from_config(c, data)
    self.key = jax.random.key(c.seed)
    model, self.init = pipeline.build_model(c, data, jax.random.fold_in(self.key, 0))
    self.trainer = pipeline.make_trainer(c, model, data, self.scene)
    self.recipes = {name: pipeline.stage_recipe(c, name) for name in methods.TRAINING}
    self.inputs = {name: workdir_lib.stage_inputs(c, "train", None, stage=name, pools=r.pools,
                                                  held_out="validation")
                   for name, r in self.recipes.items()}

  def train(self, workdir: str) -> None:
    """Trains (or restores) the tuning seed's Original and Gold in <workdir>/search."""
    c, abstract = self.config, pipeline.abstract_variables(self.trainer, self.init)
    self.models, self.records = {}, {}
    for name, recipe in self.recipes.items():
      self.models[name], self.records[name] = pipeline._stage(
          self.trainer, os.path.join(workdir, "search"), abstract, name, self.init, recipe,
          pipeline.stage_key(self.key, name), self.inputs[name], c)
    self.gold, self.gold_test_probs, _ = pipeline.model_metrics(
        self.trainer, self.models["retrain"], self.scene, None, c.seed)
    self.gold["seconds"] = self.records["retrain"]["seconds"]

  def trial(self, method: str, values: dict) -> dict:
    """One unlearning run of `method` with `values` from the Original, judged against Gold.

    Returns its metrics and gaps, or a diverged marker, with "run_seconds" (the
    method, compiling apart), "compile_seconds" and "eval_seconds"."""
    recipe = pipeline.stage_recipe(search.apply(self.config, {method: values}), method)
    t0 = time.perf_counter()
    try:
      variables, log = self.trainer.run(self.models["original"], recipe,
                                        pipeline.stage_key(self.key, method), desc=method)
      variables = jax.block_until_ready(variables)
    except train.Diverged as e:
      return {"diverged_step": e.step, "diverged_phase": e.phase,
              "run_seconds": time.perf_counter() - t0, "compile_seconds": 0.0, "eval_seconds": 0.0}
    run_seconds = time.perf_counter() - t0 - log["compile_seconds"]
    t1 = time.perf_counter()
    metrics, _, _ = pipeline.model_metrics(self.trainer, variables, self.scene,
                                           self.gold_test_probs, self.config.seed)
    metrics = dict(metrics, seconds=run_seconds)
    if "diverged_step" not in metrics:
      metrics.update(evaluate.gaps_to_gold(metrics, self.gold))
    return dict(metrics, run_seconds=run_seconds, compile_seconds=log["compile_seconds"],
                eval_seconds=time.perf_counter() - t1)


def _sampler(config, index: int):
  import optuna
  seed = config.tune.seed + index  # each method's own stream, the same on every rerun
  if config.tune.sampler == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(seed=seed)


def _study(config, workdir: str, method: str, index: int, identity: dict):
  """The method's Optuna study in <workdir>/tuning/optuna.db (created, or loaded to resume).

  A study records what it searched (`identity`: space, objective, sampler, seed, the
  tuning inputs); another search in the same workdir stops with one line. Trials left
  running by a killed search are marked failed: they run again."""
  import optuna
  folder = os.path.join(workdir, "tuning")
  os.makedirs(folder, exist_ok=True)
  storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(folder, 'optuna.db')}")
  study = optuna.create_study(
      study_name=method, storage=storage, load_if_exists=True, sampler=_sampler(config, index),
      direction="maximize" if maximize(config.tune.objective) else "minimize")
  recorded = study.user_attrs.get("identity")
  if recorded is None:
    study.set_user_attr("identity", identity)
  else:
    workdir_lib.check_inputs(f"{folder}/optuna.db ({method})", recorded, identity)
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
  return study


def defaults(config, method: str, space: dict) -> dict:
  """The method's configured values of the searched fields, clipped into the space."""
  section = config[methods.section_name(method)]
  clip = lambda k, r: min(max(section[k], r.low), r.high)
  return {k: int(clip(k, r)) if r.integer else float(clip(k, r))
          for k, r in space.items() if r.low != r.high}


def tune_method(search_: Search, config, workdir: str, method: str, index: int, identity: dict):
  """Runs the method's remaining trials (of `tune.trials`, within `tune.minutes`); its study."""
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and tables say it
  study = _study(config, workdir, method, index, identity)
  space = search.space(config, method)
  if not study.trials:  # the first trial is the config's own settings: tuning never does worse
    study.enqueue_trial(defaults(config, method, space))
  done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
  spent = sum(t.duration.total_seconds() for t in done if t.duration)
  budget = config.tune.minutes * 60 - spent if config.tune.minutes else None
  left = config.tune.trials - len(done)
  if left <= 0 or (budget is not None and budget <= 0):
    return study

  def objective(trial):
    values = search.suggest(trial, space)
    t0 = time.perf_counter()
    metrics = search_.trial(method, values)
    for k in ("run_seconds", "compile_seconds", "eval_seconds"):
      trial.set_user_attr(k, metrics[k])
    trial.set_user_attr("wall_seconds", time.perf_counter() - t0)
    trial.set_user_attr("values", values)
    trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return objective_value(metrics, config.tune.objective)

  study.optimize(objective, n_trials=left, timeout=budget, show_progress_bar=config.progress,
                 gc_after_trial=False)
  return study


def identity(config, search_: Search, method: str) -> dict:
  """What a method's study depends on: its space, the objective, the sampler, the tuning
  inputs (data, model, seed, split, Original's recipe) and its section's other fields."""
  space = search.space(config, method)
  section = {k: v for k, v in config[methods.section_name(method)].to_dict().items()
             if k not in space}
  return json.loads(json.dumps(dict(
      space={k: dataclasses.asdict(r) for k, r in space.items()}, section=section,
      objective=config.tune.objective, sampler=config.tune.sampler,
      tuning=search_.inputs["original"])))


def run(config, workdir: str) -> dict:
  """Tunes `tune.methods`, writes the tuning tables, figures and tuned.json, then runs the
  tuned methods on the evaluation seeds into <workdir>/eval; returns both results."""
  from jaxunlearn import config as config_lib, tuning_report
  config_lib.validate(config)
  pipeline.use_compilation_cache(config.compilation_cache)
  names = search.method_list(config)
  search_ = Search(config)  # data loaded and checked before anything is written
  with workdir_lib.claim(config, workdir) as config_dict:
    workdir_lib.record_config(workdir, config_dict)
    search_.train(workdir)
    studies = {}
    for i, m in enumerate(names):
      print(f"=== tuning {methods.METHODS[m].DISPLAY_NAME} ({i + 1}/{len(names)})", flush=True)
      studies[m] = tune_method(search_, config, workdir, m, i, identity(config, search_, m))
    summary = tuning_report.summarize(studies, config)
    print(tuning_report.write(workdir, summary, studies))
  eval_config = config.copy_and_resolve_references()
  eval_config.methods, eval_config.tune.methods = ",".join(names), ""
  eval_config.tuned = os.path.join(workdir, tuning_report.TUNED_FILE)
  results = pipeline.train_and_evaluate(eval_config, os.path.join(workdir, "eval"))
  return {"tuning": summary, "eval": results}
