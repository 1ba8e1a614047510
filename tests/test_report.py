"""Figures say what was forgotten, by class name where the data set has names."""
import numpy as np
import pytest

from jaxunlearn import report

NAMES = {"original": "Original", "retrain": "Gold (retrain)", "salun": "SalUn"}
WHAT = "class 0 (airplane)"


@pytest.fixture
def titles(monkeypatch):
  """The figure's title and its panels' titles, instead of PNG bytes."""
  def capture(fig):
    import matplotlib.pyplot as plt
    suptitle = fig._suptitle.get_text() if fig._suptitle else ""
    panels = [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    return suptitle, panels
  monkeypatch.setattr(report, "_png", capture)


def _metrics(forget):
  return {"forget_train_acc": forget, "retain_test_acc": 90.0, "mia_efficacy": 50.0}


def test_tradeoff_figure_names_the_forgotten_class(titles):
  per_seed = {s: {m: _metrics(10.0 * s + i) for i, m in enumerate(NAMES)} for s in (0, 1)}
  suptitle, _ = report.tradeoff_figure(per_seed, NAMES, WHAT)
  assert suptitle.startswith("Forgotten: class 0 (airplane). Each point: one method, one seed "
                             "(2 seeds)")


def test_loss_figure_names_the_forgotten_class(titles):
  losses = {m: list(np.linspace(1, 0, 5)) for m in NAMES}
  suptitle, panels = report.loss_figure(losses, NAMES, WHAT)
  assert suptitle == "Training loss; forgotten: class 0 (airplane)"
  assert panels[:3] == list(NAMES.values())


def test_tsne_figure_names_the_forgotten_class(titles):
  points = {m: np.random.default_rng(0).normal(size=(6, 2)) for m in NAMES}
  suptitle, _ = report.tsne_figure(points, np.arange(6) < 2, NAMES, WHAT)
  assert suptitle == "Forget set: class 0 (airplane)"
