"""The field's metrics (privacy, gaps to Gold, seeds) against independent computations."""
import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from jaxunlearn import evaluate, privacy, report, train
from tests.test_methods import C, Linear, tiny_data

rng = np.random.default_rng(0)


def test_mia_efficacy_calls_forget_examples_like_non_members_non_members():
  member = rng.uniform(0.95, 1.0, 200)  # confident on what it trained on
  nonmember = rng.uniform(0.0, 0.5, 200)
  assert privacy.mia_efficacy(member, nonmember, rng.uniform(0.0, 0.4, 50)) == 100.0
  assert privacy.mia_efficacy(member, nonmember, rng.uniform(0.96, 1.0, 50)) == 0.0
  half = np.r_[rng.uniform(0.0, 0.4, 25), rng.uniform(0.96, 1.0, 25)]
  assert privacy.mia_efficacy(member, nonmember, half) == 50.0


def test_mia_efficacy_matches_the_reference_procedure():
  # Unlearn-Sparse SVC_MIA: shadow train = members (1) + non-members (0), features the
  # true-label confidence, SVC(C=3, gamma='auto'); efficacy = 1 - mean(predict(target)).
  from sklearn.svm import SVC
  member, nonmember, target = rng.beta(5, 1, 300), rng.beta(2, 2, 300), rng.beta(3, 2, 120)
  clf = SVC(C=3, gamma="auto", kernel="rbf")
  clf.fit(np.concatenate([member, nonmember]).reshape(-1, 1),
          np.concatenate([np.ones_like(member), np.zeros_like(nonmember)]))
  want = 100 * (1 - clf.predict(target.reshape(-1, 1)).mean())
  assert privacy.mia_efficacy(member, nonmember, target) == pytest.approx(want)


def test_loss_mia_matches_a_hand_written_cross_validation():
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedShuffleSplit
  forget, holdout = rng.exponential(0.3, 80), rng.exponential(1.0, 120)
  acc, ind = privacy.loss_mia(forget, holdout, seed=3)
  r = np.random.default_rng(3)
  f, h = r.permutation(forget)[:80], r.permutation(holdout)[:80]
  x, y = np.r_[f, h][:, None], np.r_[np.ones(80), np.zeros(80)]
  scores = []
  for tr, te in StratifiedShuffleSplit(n_splits=10, test_size=0.1, random_state=3).split(x, y):
    scores.append(LogisticRegression().fit(x[tr], y[tr]).score(x[te], y[te]))
  assert acc == pytest.approx(100 * np.mean(scores))
  assert ind == pytest.approx(1 - abs(np.mean(scores) - 0.5) / 0.5)


def test_loss_mia_is_fifty_percent_on_identical_distributions_and_perfect_when_separated():
  same = rng.exponential(1.0, 4000)
  acc, ind = privacy.loss_mia(same[:2000], same[2000:], seed=0)
  assert acc == pytest.approx(50, abs=4) and ind > 0.9
  acc, ind = privacy.loss_mia(rng.uniform(0, 0.1, 100), rng.uniform(5, 6, 100), seed=0)
  assert acc == 100.0 and ind == 0.0


def test_linear_probe_finds_a_linearly_separable_class():
  centers = rng.normal(size=(3, 8)) * 5
  labels = rng.integers(0, 3, 300)
  feats = centers[labels] + rng.normal(size=(300, 8)) * 0.1
  assert privacy.linear_probe_accuracy(feats[:200], labels[:200], feats[200:], labels[200:]) == 100.0
  noise = rng.normal(size=(300, 8))
  assert privacy.linear_probe_accuracy(noise[:200], labels[:200], noise[200:], labels[200:]) < 60


def test_privacy_metrics_pick_the_reference_sets(monkeypatch):
  seen = {}
  monkeypatch.setattr(privacy, "mia_efficacy", lambda m, n, t: seen.update(mia=(m, n, t)) or 0.0)
  monkeypatch.setattr(privacy, "loss_mia", lambda f, n, seed: seen.update(loss=(f, n)) or (0.0, 0.0))
  monkeypatch.setattr(privacy, "linear_probe_accuracy",
                      lambda a, b, c, d: seen.update(probe=(a, b, c, d)) or 0.0)
  C, N, M = 3, 40, 12
  ytr, yte = np.arange(N) % C, np.arange(M) % C
  ptr, pte = rng.dirichlet(np.ones(C), N), rng.dirichlet(np.ones(C), M)
  ftr, fte = rng.normal(size=(N, 4)), rng.normal(size=(M, 4))
  ltr, lte = rng.exponential(size=N), rng.exponential(size=M)  # losses, as predict gives them
  losses = dict(train_loss_N=ltr, test_loss_M=lte)
  # Class-wise, class 1.
  evaluate.privacy_metrics(ytr == 1, yte == 1, ptr, ytr, pte, yte, ftr, fte, **losses, seed=0)
  conf_tr, conf_te = ptr[np.arange(N), ytr], pte[np.arange(M), yte]
  member, nonmember, target = seen["mia"]
  np.testing.assert_array_equal(nonmember, conf_te[yte != 1])  # test set without the class
  np.testing.assert_array_equal(member, conf_tr[ytr != 1][:8])  # first len(non-members) retain
  np.testing.assert_array_equal(target, conf_tr[ytr == 1])
  f, n = seen["loss"]
  np.testing.assert_array_equal(f, ltr[ytr == 1])
  np.testing.assert_array_equal(n, lte[yte == 1])  # same-class test examples
  a, b, c, d = seen["probe"]
  np.testing.assert_array_equal(a, ftr)  # fit on every training example
  np.testing.assert_array_equal(c, fte[yte == 1])  # scored on the class's test examples
  # Random subset: no test example is forgotten.
  forget = np.zeros(N, bool)
  forget[::5] = True
  evaluate.privacy_metrics(forget, np.zeros(M, bool), ptr, ytr, pte, yte, ftr, fte, **losses,
                           seed=0)
  member, nonmember, target = seen["mia"]
  np.testing.assert_array_equal(nonmember, conf_te)
  np.testing.assert_array_equal(member, conf_tr[~forget][:M])
  f, n = seen["loss"]
  np.testing.assert_array_equal(f, ltr[forget])
  np.testing.assert_array_equal(n, lte)
  a, b, c, d = seen["probe"]
  np.testing.assert_array_equal(a, ftr[~forget])
  np.testing.assert_array_equal(c, ftr[forget])


def test_predicted_losses_come_from_the_logits_even_on_a_collapsed_model():
  # A collapsed model: logits thousands apart, so every probability but the top one is
  # 0 in float32 and a loss read off probabilities would stop at -log(1e-30) = 69.08.
  data = tiny_data()
  t = train.Trainer(Linear(C), data, {"all": np.arange(len(data.train_labels))}, batch_size=8,
                    steps_per_chunk=2, eval_batch_size=16, progress=False)
  kernel = (rng.normal(size=(16, C)) * 300).astype(np.float32)
  bias = np.array([0.0, 1e4, -1e4], np.float32)
  variables = {"params": {"head": {"kernel": kernel, "bias": bias}}}
  for split, (x_u8, y) in (("train", (data.train_images, data.train_labels)),
                           ("test", (data.test_images, data.test_labels))):
    probs, _, loss = jax.device_get(t.predict(variables, split, with_loss=True))
    h = ((x_u8.astype(np.float64) / data.pixel_max - 0.5) / 0.5).reshape(len(y), -1)
    want = -log_softmax(h @ kernel.astype(np.float64) + bias, -1)[np.arange(len(y)), y]
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert want.max() > 1e4 and (probs[np.arange(len(y)), y] == 0).any()  # it is collapsed
    np.testing.assert_array_equal(probs, jax.device_get(t.predict(variables, split)[0]))


def test_gaps_to_gold_avg_gap_tow_and_rte():
  gold = dict(forget_train_acc=0.0, retain_train_acc=99.0, retain_test_acc=95.0, mia_efficacy=100.0,
              seconds=60.0)
  model = dict(forget_train_acc=10.0, retain_train_acc=97.0, retain_test_acc=90.0, mia_efficacy=80.0,
               seconds=6.0)
  g = evaluate.gaps_to_gold(model, gold)
  assert (g["gap_forget_train_acc"], g["gap_retain_train_acc"], g["gap_retain_test_acc"],
          g["gap_mia_efficacy"]) == (10.0, 2.0, 5.0, 20.0)
  assert g["avg_gap"] == pytest.approx((10 + 2 + 5 + 20) / 4)
  assert g["tow"] == pytest.approx(0.90 * 0.98 * 0.95)  # RUM: prod of (1 - |d|/100)
  assert g["rte"] == pytest.approx(10.0)
  same = evaluate.gaps_to_gold(gold, gold)
  assert same["avg_gap"] == 0 and same["tow"] == 1 and same["rte"] == 1


def test_aggregate_is_mean_and_sample_sd_per_model_and_metric():
  per_seed = {s: {"a": {"x": float(v), "y": 1.0}} for s, v in zip((0, 1, 2), (1, 2, 6))}
  mean, std = report.aggregate(per_seed)
  assert mean["a"]["x"] == 3.0 and std["a"]["x"] == pytest.approx(np.std([1, 2, 6], ddof=1))
  assert std["a"]["y"] == 0.0
  mean, std = report.aggregate({0: {"a": {"x": 1.0}}})
  assert mean["a"]["x"] == 1.0 and std["a"]["x"] is None


def test_loss_mia_on_tiny_sets_is_omitted_or_still_splits():
  assert privacy.loss_mia(np.ones(3), np.zeros(50), seed=0) is None
  acc, _ = privacy.loss_mia(rng.uniform(0, 0.1, 6), rng.uniform(5, 6, 6), seed=0)
  assert acc == 100.0
