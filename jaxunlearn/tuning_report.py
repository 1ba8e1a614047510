"""What a tuning run writes: the best settings per method, the trials' time, Optuna's figures.

<workdir>/tuned.json         {method: {field: value}}: `--config.tuned=` applies it
<workdir>/tuning/tuning.md   one row per method: best settings, objective, trials, time
<workdir>/tuning/tuning.json the same, with every trial
<workdir>/tuning/<method>_history.png, <method>_importance.png   Optuna's plots
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

from jaxunlearn import methods, workdir as workdir_lib

TUNED_FILE = "tuned.json"


def _complete(study):
  import optuna
  return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def summarize(studies: dict, config) -> dict:
  """Per method: best values and objective, trials, and where a trial's time goes."""
  out = {}
  for m, study in studies.items():
    trials = _complete(study)
    if not trials:
      continue
    attr = lambda k: np.array([t.user_attrs.get(k, 0.0) for t in trials])
    wall, run, ev, comp = (attr(k) for k in ("wall_seconds", "run_seconds", "eval_seconds",
                                             "compile_seconds"))
    best = study.best_trial
    out[m] = dict(
        values=best.user_attrs["values"], objective=config.tune.objective,
        best=float(best.value), metrics=best.user_attrs["metrics"], trials=len(trials),
        diverged=int(sum("diverged_step" in t.user_attrs["metrics"] for t in trials)),
        seconds=float(wall.sum()), run_seconds=float(run.sum()), eval_seconds=float(ev.sum()),
        compile_seconds=float(comp.sum()),
        # A trial's time beyond the method's run, its evaluation and (first trial) compiling.
        overhead=float(max(wall.sum() - run.sum() - ev.sum() - comp.sum(), 0.0)
                       / max(wall.sum(), 1e-9)),
        trials_per_minute=float(60 * len(trials) / max(wall.sum(), 1e-9)),
        all_trials=[dict(number=t.number, value=t.value, values=t.user_attrs["values"],
                         wall_seconds=t.user_attrs["wall_seconds"]) for t in trials])
  return out


def _settings(values: dict) -> str:
  return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in values.items())


def table(summary: dict) -> str:
  rows = ["| Method | Best settings | Objective (validation) | Trials | Diverged | Time (s) | "
          "Run / eval / compile (s) | Overhead |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
  for m, r in summary.items():
    rows.append(
        f"| {methods.METHODS[m].DISPLAY_NAME} | {_settings(r['values'])} | {r['objective']} "
        f"{r['best']:.3f} | {r['trials']} | {r['diverged']} | {r['seconds']:.1f} | "
        f"{r['run_seconds']:.1f} / {r['eval_seconds']:.1f} / {r['compile_seconds']:.1f} | "
        f"{100 * r['overhead']:.1f}% |")
  return "\n".join(rows)


def figures(folder: str, studies: dict) -> list[str]:
  """Optuna's optimisation history and hyperparameter importances per method, as PNGs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import optuna
  from optuna.visualization import matplotlib as ovm
  written = []
  for m, study in studies.items():
    if len(_complete(study)) < 2:
      continue
    for kind, plot in (("history", ovm.plot_optimization_history),
                       ("importance", ovm.plot_param_importances)):
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
          ax = plot(study)
      except (ValueError, RuntimeError):  # e.g. importances of a space with one value
        continue
      title = ax.get_title() or {"history": "Optimization History",
                                 "importance": "Hyperparameter Importances"}[kind]
      ax.set_title(f"{methods.METHODS[m].DISPLAY_NAME}: {title}", loc="left")
      path = os.path.join(folder, f"{m}_{kind}.png")
      ax.figure.savefig(path, dpi=100, bbox_inches="tight")
      plt.close(ax.figure)
      written.append(path)
  return written


def write(workdir: str, summary: dict, studies: dict) -> str:
  """Writes tuned.json, tuning.md, tuning.json and the figures; returns tuning.md's text."""
  folder = os.path.join(workdir, "tuning")
  os.makedirs(folder, exist_ok=True)
  figures(folder, studies)
  text = ("# Tuning on held-out data (validation split of the training set)\n\n"
          + table(summary) + "\n")
  workdir_lib.atomic_write(os.path.join(folder, "tuning.json"), json.dumps(summary, indent=2))
  workdir_lib.atomic_write(os.path.join(folder, "tuning.md"), text)
  workdir_lib.atomic_write(os.path.join(workdir, TUNED_FILE),
                           json.dumps({m: r["values"] for m, r in summary.items()}, indent=2))
  return text
