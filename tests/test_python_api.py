"""From Python: one's own arrays and one's own Flax model through `pipeline.train_and_evaluate`."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxunlearn import config as config_lib, datasets, models, pipeline


class MLP(nn.Module):
  """A user's own model: any Linen module returning (logits, features)."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(h), h


def _arrays(seed=0, n=96, m=48):
  """Three separable classes of 6x6 grey images: each class lights a band of rows."""
  r = np.random.default_rng(seed)
  def split(k):
    y = np.arange(k) % 3
    x = r.integers(0, 60, (k, 6, 6, 1))
    for c in range(3):
      x[y == c, 2 * c:2 * c + 2] += 180
    return x.astype(np.uint8), y.astype(np.int32)
  (xtr, ytr), (xte, yte) = split(n), split(m)
  return datasets.Dataset(xtr, ytr, xte, yte, num_classes=3, pixel_max=255.0,
                          class_names=("top", "middle", "bottom"))


def _config():
  c = config_lib.get_base_config()
  c.forget_class, c.batch_size, c.methods = "1", 16, "finetune,gradient_ascent"
  c.train.epochs, c.train.learning_rate = 6, 0.1
  c.finetune.epochs = c.gradient_ascent.epochs = 1
  c.tsne.num_forget = c.tsne.num_retain = 0
  c.progress = False
  return c


def test_own_arrays_and_own_flax_model(tmp_path):
  data = _arrays()
  out = pipeline.train_and_evaluate(_config(), str(tmp_path), data=data, model=MLP())
  assert set(out["models"]) == {"original", "retrain", "finetune", "gradient_ascent"}
  # The model learnt the arrays (they are separable) and Gold never saw class 1.
  assert out["models"]["original"]["retain_test_acc"] > 90
  assert out["models"]["retrain"]["forget_test_acc"] == 0
  with open(tmp_path / "results.md") as f:
    assert "Forgotten: class 1 (middle)" in f.read()
  # The same call again reuses every stage; other arrays in the same workdir are refused.
  again = pipeline.train_and_evaluate(_config(), str(tmp_path), data=data, model=MLP())
  assert again["models"]["original"]["seconds"] == out["models"]["original"]["seconds"]
  with pytest.raises(ValueError, match="own_data"):
    pipeline.train_and_evaluate(_config(), str(tmp_path), data=_arrays(seed=1), model=MLP())


def test_own_model_with_given_variables_starts_from_them(tmp_path):
  data = _arrays()
  module = MLP()
  variables = models.Model(module).init(jax.random.key(7), (1, 6, 6, 1))
  c = _config()
  c.methods, c.train.epochs = "finetune", 1
  model, got = pipeline.build_model(c, data, jax.random.key(0), (module, variables))
  assert isinstance(model, models.Model) and not model.stateful
  jax.tree.map(np.testing.assert_array_equal, got, dict(variables))
  out = pipeline.train_and_evaluate(c, str(tmp_path), data=data, model=module, variables=variables)
  assert np.isfinite(out["models"]["finetune"]["retain_test_acc"])


class LogitsOnly(nn.Module):
  """A user's model that forgets to return its features."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("module,message", [
    (LogitsOnly(), "must return \\(logits, features\\)"),
    (MLP(num_classes=5), "logits"),
], ids=["no-features", "wrong-class-count"])
def test_own_model_with_unusable_outputs_is_one_line_before_any_work(tmp_path, module, message):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message) as e:
    pipeline.train_and_evaluate(_config(), str(workdir), data=_arrays(), model=module)
  assert "\n" not in str(e.value)
  assert not workdir.exists()  # refused before the workdir was claimed
