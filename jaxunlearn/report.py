"""Results as files a person reads: JSON, the study's Table 1 (Markdown, CSV), t-SNE figure.

Every file is written to a temporary name and renamed into place, so a failed
run never leaves a half-written file over an earlier good one.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from jaxunlearn.workdir import atomic_write

# (key in results, column header). The first four are the study's Table 1.
COLUMNS = (
    ("forget_train_acc", "Forget Acc (train) %"),
    ("retain_test_acc", "Retain Acc (test) %"),
    ("entropy_forget_test", "Entropy (forget test)"),
    ("jsd_gold_forget_test", "JSD to Gold (forget test)"),
    ("forget_test_acc", "Forget Acc (test) %"),
    ("retain_train_acc", "Retain Acc (train) %"),
    ("test_acc", "Test Acc %"),
    ("seconds", "Time (s)"),
)


def _fmt(key, value):
  if key.endswith("acc"):
    return f"{value:.2f}"
  if key == "seconds":
    return f"{value:.1f}"
  return f"{value:.4f}"


def markdown_table(models: dict[str, dict], names: dict[str, str]) -> str:
  header = "| Model | " + " | ".join(h for _, h in COLUMNS) + " |"
  rule = "|---|" + "---:|" * len(COLUMNS)
  rows = [f"| {names[m]} | " + " | ".join(_fmt(k, r[k]) for k, _ in COLUMNS) + " |"
          for m, r in models.items()]
  return "\n".join([header, rule, *rows]) + "\n"


def csv_table(models: dict[str, dict]) -> str:
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(["model", *(k for k, _ in COLUMNS)])
  for m, r in models.items():
    w.writerow([m, *(r[k] for k, _ in COLUMNS)])
  return out.getvalue()


def tsne(features_NxD: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
  """scikit-learn t-SNE to 2-D with the study's settings (PCA init, automatic learning rate)."""
  from sklearn.manifold import TSNE
  perplexity = min(perplexity, (len(features_NxD) - 1) / 3)  # sklearn needs perplexity < n
  return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(features_NxD)


def tsne_figure(embeddings: dict[str, np.ndarray], is_forget: np.ndarray,
                names: dict[str, str]) -> bytes:
  """One panel per model, retain grey, forget red (as the study's Figure 1); PNG bytes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(embeddings)
  fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
  for ax, (m, xy) in zip(axes[0], embeddings.items()):
    ax.scatter(*xy[~is_forget].T, s=4, c="0.6", label="retain")
    ax.scatter(*xy[is_forget].T, s=4, c="red", label="forget")
    ax.set_title(names[m])
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0][0].legend(loc="best", fontsize=8, markerscale=3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def write(workdir: str, config_dict: dict, models: dict[str, dict], names: dict[str, str],
          tsne_png: bytes | None) -> str:
  """Writes results.json, results.md, results.csv (and tsne.png); returns the Markdown table."""
  table = markdown_table(models, names)
  atomic_write(os.path.join(workdir, "results.json"),
               json.dumps({"config": config_dict, "models": models}, indent=2))
  atomic_write(os.path.join(workdir, "results.csv"), csv_table(models))
  atomic_write(os.path.join(workdir, "results.md"), "# Unlearning results\n\n" + table)
  if tsne_png is not None:
    atomic_write(os.path.join(workdir, "tsne.png"), tsne_png)
  return table
