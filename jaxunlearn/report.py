"""Results as files a person reads: JSON, tables (Markdown, CSV) and figures.

A run writes its models' metrics; a multi-seed run adds mean ± sd over seeds and
the forget/retain trade-off figure. Every table marks a model whose numbers are no
result of unlearning: diverged (non-finite, `train.Diverged`) or saturated
(`saturation.py`).

Every file is written to a temporary name and renamed into place, so a failed run
never leaves a half-written file over an earlier good one; results.json comes last
and results.md records its digest (`read`), so a run stopped between the two never
passes one run's tables off as another's.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os

import numpy as np

from jaxunlearn.workdir import atomic_write

# (key in results, column header). The first four are the study's Table 1.
STUDY_COLUMNS = (
    ("forget_train_acc", "Forget Acc (train) %"),
    ("retain_test_acc", "Retain Acc (test) %"),
    ("entropy_forget_test", "Entropy (forget test)"),
    ("jsd_gold_forget_test", "JSD to Gold (forget test)"),
    ("forget_test_acc", "Forget Acc (test) %"),
    ("retain_train_acc", "Retain Acc (train) %"),
    ("test_acc", "Test Acc (all) %"),
    ("seconds", "Time (s)"),
)
# What the field reports: privacy, gaps to Gold (TA = retain test accuracy), efficiency.
FIELD_COLUMNS = (
    ("mia_efficacy", "MIA-efficacy %"),
    ("loss_mia", "Loss-MIA %"),
    ("indiscernibility", "Indiscernibility"),
    ("probe_forget_acc", "Probe Forget Acc %"),
    ("gap_forget_train_acc", "Gap FA"),
    ("gap_retain_train_acc", "Gap RA"),
    ("gap_retain_test_acc", "Gap TA"),
    ("gap_mia_efficacy", "Gap MIA"),
    ("avg_gap", "Avg Gap"),
    ("tow", "ToW"),
    ("rte", "RTE (x)"),
    ("compile_seconds", "Compile (s)"),
)
# Marks, last in every table, each present only when some model has it.
MARKS = (
    # The step where its loss or parameters became non-finite (its metrics stay empty).
    ("diverged_step", "Diverged at step"),
    # Over seeds: in how many it diverged (its mean and sd are over the others).
    ("diverged_seeds", "Diverged (seeds)"),
    # Its predictions collapsed to one class or its loss stopped changing (`saturation.py`):
    # "class 3", "loss flat from step 12", or both. Its metrics are still shown.
    ("saturated", "Saturated"),
    # Over seeds: in how many it saturated (its mean and sd include them).
    ("saturated_seeds", "Saturated (seeds)"),
)
COLUMNS = STUDY_COLUMNS + FIELD_COLUMNS + MARKS
# What results.json holds for the "saturated" mark.
SATURATION_KEYS = ("saturated_class", "saturated_step")


def _fmt(key, value):
  if value is None:
    return "—"
  if isinstance(value, str):
    return value
  if key in ("diverged_step", "diverged_seeds", "saturated_seeds"):
    return f"{value:.0f}"
  if key in ("seconds", "compile_seconds", "rte"):
    return f"{value:.1f}"
  if key.endswith("acc") or key.startswith("gap_") or key in ("mia_efficacy", "loss_mia", "avg_gap"):
    return f"{value:.2f}"
  return f"{value:.4f}"


def _fmt_sd(key, mean, sd):
  return _fmt(key, mean) if sd is None else f"{_fmt(key, mean)} ± {_fmt(key, sd)}"


def _table(rows: list[tuple[str, dict]], columns, cell) -> str:
  present = [(k, h) for k, h in columns if any(k in r for _, r in rows)]
  header = "| Model | " + " | ".join(h for _, h in present) + " |"
  rule = "|---|" + "---:|" * len(present)
  lines = [f"| {name} | " + " | ".join(cell(k, r) for k, _ in present) + " |" for name, r in rows]
  return "\n".join([header, rule, *lines]) + "\n"


def saturation_text(r: dict) -> str | None:
  """The "saturated" mark of one model's results ("class 3; loss flat from step 12"), or None."""
  parts = []
  if "saturated_class" in r:
    parts.append(f"class {r['saturated_class']}")
  if "saturated_step" in r:
    parts.append(f"loss flat from step {r['saturated_step']}")
  return "; ".join(parts) or None


def _marked(r: dict) -> dict:
  text = saturation_text(r)
  return r if text is None else dict(r, saturated=text)


def markdown_table(models: dict[str, dict], names: dict[str, str], columns=STUDY_COLUMNS) -> str:
  """One row per model; columns no model has (e.g. forget-test metrics of a random subset) are
  left out; the marks (diverged, saturated) follow `columns`."""
  return _table([(names[m], _marked(r)) for m, r in models.items()], columns + MARKS,
                lambda k, r: _fmt(k, r.get(k)))


def csv_table(models: dict[str, dict]) -> str:
  out = io.StringIO()
  w = csv.writer(out)
  keys = [k for k, _ in COLUMNS if any(k in r for r in models.values())]
  keys += [k for k in SATURATION_KEYS if any(k in r for r in models.values())]
  w.writerow(["model", *keys])
  for m, r in models.items():
    w.writerow([m, *(r.get(k, "") for k in keys)])
  return out.getvalue()


def tsne(features_NxD: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
  """scikit-learn t-SNE to 2-D with the study's settings (PCA init, automatic learning rate)."""
  from sklearn.manifold import TSNE
  perplexity = min(perplexity, (len(features_NxD) - 1) / 3)  # sklearn needs perplexity < n
  return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(features_NxD)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  _pyplot().close(fig)
  return buf.getvalue()


def _grid(n: int, width: float, height: float, max_cols: int = 5):
  plt = _pyplot()
  cols = min(n, max_cols)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  return fig, axes.ravel()


def tsne_figure(embeddings: dict[str, np.ndarray], is_forget: np.ndarray,
                names: dict[str, str], forgotten: str = "") -> bytes:
  """One panel per model, retain grey, forget red (as the study's Figure 1); PNG bytes.

  `forgotten` says what the forget set is ("class 0 (airplane)"), in the title."""
  fig, axes = _grid(len(embeddings), 3.2, 3.4)
  for ax, (m, xy) in zip(axes, embeddings.items()):
    ax.scatter(*xy[~is_forget].T, s=4, c="0.6", label="retain")
    ax.scatter(*xy[is_forget].T, s=4, c="red", label="forget")
    ax.set_title(names[m])
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0].legend(loc="best", fontsize=8, markerscale=3)
  if forgotten:
    fig.suptitle(f"Forget set: {forgotten}", fontsize=10)
  fig.tight_layout()
  return _png(fig)


def loss_figure(losses: dict[str, list[float]], names: dict[str, str],
                forgotten: str = "") -> bytes:
  """Each stage's training loss per step (one panel per model), titled with what was
  forgotten (class names included); PNG bytes."""
  fig, axes = _grid(len(losses), 3.2, 2.6)
  for ax, (m, curve) in zip(axes, losses.items()):
    if curve:
      ax.plot(np.arange(1, len(curve) + 1), curve, lw=0.8)
    else:
      ax.text(0.5, 0.5, "no training", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(names[m], fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0].set_ylabel("loss", fontsize=8)
  if forgotten:
    fig.suptitle(f"Training loss; forgotten: {forgotten}", fontsize=10)
  fig.tight_layout()
  return _png(fig)


def tradeoff_figure(per_seed: dict[int, dict[str, dict]], names: dict[str, str],
                    forgotten: str = "") -> bytes:
  """Forget accuracy against retain test accuracy and against MIA-efficacy, titled with
  what was forgotten (class names included).

  One point per method per seed (one colour per method), Gold as black stars;
  the closer a method's points sit to Gold's, the closer it came to retraining.
  """
  plt = _pyplot()
  panels = [("retain_test_acc", "Retain Acc (test) %"), ("mia_efficacy", "MIA-efficacy %")]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
  models = list(next(iter(per_seed.values())))
  colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(models), 2)))
  for ax, (key, label) in zip(axes[0], panels):
    for i, m in enumerate(models):
      pts = [(r[m]["forget_train_acc"], r[m][key]) for r in per_seed.values()
             if m in r and key in r[m] and "forget_train_acc" in r[m]]
      if not pts:
        continue
      x, y = np.array(pts).T
      if m == "retrain":
        ax.scatter(x, y, marker="*", s=160, c="black", label=names[m], zorder=3)
      else:
        ax.scatter(x, y, s=22, color=colours[i], label=names[m], alpha=0.85,
                   marker="s" if m == "original" else "o")
    ax.set_xlabel("Forget Acc (train) %")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
  what = f"Forgotten: {forgotten}. " if forgotten else ""
  fig.suptitle(f"{what}Each point: one method, one seed ({len(per_seed)} seeds); "
               "Gold = black star", fontsize=10)
  fig.tight_layout()
  return _png(fig)


def _forgotten(text: str) -> str:
  return f"Forgotten: {text}\n\n" if text else ""


def write(workdir: str, config_dict: dict, models: dict[str, dict], names: dict[str, str],
          figures: dict[str, bytes], forgotten: str = "") -> str:
  """Writes results.json, results.md, results.csv and the figures; returns the Markdown tables.

  `forgotten` says what the forget set is, with class names ("class 0 (airplane)")."""
  tables = (_forgotten(forgotten) + markdown_table(models, names) + "\n"
            + markdown_table(models, names, FIELD_COLUMNS))
  _write_results(workdir, {"config": config_dict, "models": models, "names": names},
                 "# Unlearning results\n\n" + tables, csv_table(models), figures)
  return tables


# results.md's last line: the digest of the results.json it was written with.
_DIGEST_LINE = "<!-- results.json sha256 {} -->\n"


def _write_results(workdir: str, results: dict, markdown: str, csv_text: str,
                   figures: dict[str, bytes]) -> None:
  """The results files, each atomically; results.json last, as the commit.

  A run stopped part-way leaves the previous results.json (or none) beside newer
  files; results.md names the results.json it belongs to, so `read` tells them apart.
  """
  data = json.dumps(results, indent=2)
  for name, png in figures.items():
    atomic_write(os.path.join(workdir, name), png)
  atomic_write(os.path.join(workdir, "results.csv"), csv_text)
  atomic_write(os.path.join(workdir, "results.md"),
               markdown + "\n" + _DIGEST_LINE.format(hashlib.sha256(data.encode()).hexdigest()))
  atomic_write(os.path.join(workdir, "results.json"), data)


def read(workdir: str) -> tuple[dict, str | None]:
  """(results.json, results.md's text) of a workdir; the text is None when results.md is
  stale: missing, or written for another results.json (a run stopped between the two)."""
  with open(os.path.join(workdir, "results.json")) as f:
    data = f.read()
  try:
    with open(os.path.join(workdir, "results.md")) as f:
      markdown = f.read()
  except FileNotFoundError:
    return json.loads(data), None
  line = _DIGEST_LINE.format(hashlib.sha256(data.encode()).hexdigest())
  return json.loads(data), (markdown[:-len(line)] if markdown.endswith(line) else None)


def aggregate(per_seed: dict[int, dict[str, dict]]) -> tuple[dict, dict]:
  """Mean and sample standard deviation (ddof 1; None for one seed) per model and metric."""
  mean, std = {}, {}
  models = list(next(iter(per_seed.values())))
  for m in models:
    keys = list(dict.fromkeys(k for r in per_seed.values() for k in r.get(m, {})))
    mean[m], std[m] = {}, {}
    for k in keys:
      if k in ("diverged_step", "diverged_phase", *SATURATION_KEYS):
        continue
      values = [r[m][k] for r in per_seed.values() if m in r and isinstance(r[m].get(k), (int, float))]
      if not values:
        continue
      mean[m][k] = float(np.mean(values))
      std[m][k] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    diverged = sum("diverged_step" in r.get(m, {}) for r in per_seed.values())
    if diverged:  # the mean and sd above are over the other seeds
      mean[m]["diverged_seeds"], std[m]["diverged_seeds"] = float(diverged), None
    saturated = sum(saturation_text(r.get(m, {})) is not None for r in per_seed.values())
    if saturated:  # included in the mean and sd above
      mean[m]["saturated_seeds"], std[m]["saturated_seeds"] = float(saturated), None
  return mean, std


def write_seeds(workdir: str, config_dict: dict, per_seed: dict[int, dict[str, dict]],
                names: dict[str, str], figures: dict[str, bytes], forgotten: str = "") -> str:
  """The multi-seed summary: mean ± sd tables, then every seed's tables; returns the summary."""
  mean, std = aggregate(per_seed)
  rows = [(names[m], {k: (mean[m][k], std[m].get(k)) for k in mean[m]}) for m in mean]
  cell = lambda k, r: _fmt_sd(k, *r[k]) if k in r else "—"
  summary = (_forgotten(forgotten) + f"Mean ± sd over {len(per_seed)} seeds ({', '.join(map(str, per_seed))})\n\n"
             + _table(rows, STUDY_COLUMNS + MARKS, cell) + "\n"
             + _table(rows, FIELD_COLUMNS + MARKS, cell))
  parts = ["# Unlearning results over seeds\n", summary]
  for seed, models in per_seed.items():
    parts += [f"\n## Seed {seed}\n", markdown_table(models, names), "\n",
              markdown_table(models, names, FIELD_COLUMNS)]
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(["seed", "model", "metric", "value"])
  for seed, models in per_seed.items():
    for m, r in models.items():
      for k, v in r.items():
        w.writerow([seed, m, k, v])
  _write_results(workdir, {"config": config_dict, "seeds": {str(s): r for s, r in per_seed.items()},
                           "mean": mean, "std": std, "names": names},
                 "\n".join(parts), out.getvalue(), figures)
  return summary
