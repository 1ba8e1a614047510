"""The unlearning methods: each objective, prepare and edit against a numpy formula written
from its reference code, each recipe's phases, one short run per method, SalUn's frozen
weights, and hyperparameters that never recompile.

Trainer runs use softmax regression (`Linear`) as the model: every method reaches the model
only through `ctx.apply`, its gradients have closed forms, so the numpy references hold end
to end (SSD importances, FGSM labels, saliency), and it compiles about three times faster
than the smallest ViT.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from scipy.special import log_softmax as np_log_softmax, softmax as np_softmax

from jaxunlearn import datasets, objectives, scenario, train
from jaxunlearn.methods import (METHODS, boundary_shrinking, delete, fcs, l1_sparse, neggrad_plus,
                                random_labels, salun, scrub, ssd, ssd_det, two_stage)

C = 3  # classes of the tiny data set
FORGET_CLASS = 0
BATCH = 8


# ---- helpers: a linear model, its numpy twin, objectives compiled with a linear "model" ----

class Linear(nn.Module):
  """Softmax regression on the normalised pixels; features are the flattened input."""
  num_classes: int
  image_size: int = 4

  @nn.compact
  def __call__(self, x_BxHxWxC):
    h_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    return nn.Dense(self.num_classes, name="head")(h_BxD), h_BxD


def tiny_data():
  def split(n, seed):
    r = np.random.default_rng(seed)
    y = np.r_[np.arange(C), r.integers(0, C, n - C)].astype(np.int32)
    x = r.integers(0, 6, (n, 4, 4, 1))
    x[np.arange(n), y, :, 0] += 4  # class c brightens row c: linearly separable, not trivially
    return x.astype(np.uint8), y
  return datasets.Dataset(*split(45, 0), *split(15, 1), num_classes=C, pixel_max=16.0,
                          class_names=tuple(map(str, range(C))))


def np_inputs(data, idx):
  """What the trainer's model sees for training examples `idx`, flattened: (x / 16 - 0.5) / 0.5."""
  pixels = data.train_images[idx].astype(np.float64) / data.pixel_max
  return ((pixels - 0.5) / 0.5).reshape(len(idx), -1)


def np_head(params):
  params = params.get("params", params)  # variables or params
  return np.asarray(params["head"]["kernel"], np.float64), np.asarray(params["head"]["bias"], np.float64)


def np_ce_grads(kernel, bias, h_BxD, y_B):
  """Gradient of the batch-mean cross-entropy of logits h @ kernel + bias."""
  dz = np_softmax(h_BxD @ kernel + bias, -1)
  dz[np.arange(len(y_B)), y_B] -= 1
  dz /= len(y_B)
  return h_BxD.T @ dz, dz.sum(0)


def pool_batches(idx):
  """A sweep's batches: the pool in its order, the last one partial."""
  return [idx[s:s + BATCH] for s in range(0, len(idx), BATCH)]


def masked_mean(v_B, mask_B):
  return float(np.sum(v_B * mask_B) / max(np.sum(mask_B), 1.0))


def np_ce(logits_BxC, labels_B, mask_B):
  logp = np_log_softmax(np.asarray(logits_BxC, np.float64), -1)
  return masked_mean(-logp[np.arange(len(labels_B)), labels_B], mask_B)


def linear_apply(params, x, **kw):
  """A "model" for objective tests: logits = flattened image @ w."""
  return x.reshape(x.shape[0], -1) @ params["w"], None


def call(fn, *args, hp=None, frozen=None, num_classes=C):
  """fn(ctx, *args) compiled as a step runs it: the linear model, hp as traced scalars."""
  def run(hp, frozen, *args):
    ctx = train.Context(apply=linear_apply, rng=jax.random.key(0), progress=jnp.float32(0), hp=hp,
                        inputs=train.Inputs(frozen=frozen), num_classes=num_classes)
    return fn(ctx, *args)
  return jax.jit(run)({k: np.float32(v) for k, v in (hp or {}).items()}, frozen, *args)


def fake_batch(r, n_real, *, width=6, num_classes=C, **columns):
  """One stream's batch of 2x2 images, its first `n_real` rows real, the rest padding."""
  return dict(image=r.uniform(size=(width, 2, 2, 1)).astype(np.float32),
              label=r.integers(0, num_classes, width).astype(np.int32),
              mask=(np.arange(width) < n_real).astype(np.float32),
              index=np.arange(width, dtype=np.int32), **columns)


def np_logits(batch, w):
  return batch["image"].reshape(len(batch["image"]), -1).astype(np.float64) @ np.asarray(w, np.float64)


def sgd_values(opt):
  return (opt.kind, opt.learning_rate, opt.momentum, opt.weight_decay, opt.schedule_kind)


def streams(phase):
  return {k: (s.pool, s.epochs, s.max_steps) for k, s in phase.streams.items()}


# ---- the trainer, an Original trained briefly, and each method's short run ----

@pytest.fixture(scope="module")
def setup():
  data = tiny_data()
  forget = data.train_labels == FORGET_CLASS
  pools = scenario.Scenario("class", (FORGET_CLASS,), forget, data.test_labels == FORGET_CLASS,
                            sweep_classes=data.train_labels).pools()
  model = Linear(C)
  init = {"params": model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]}
  trainer = train.Trainer(model, data, pools, batch_size=BATCH, steps_per_chunk=8,
                          eval_batch_size=16, progress=False)
  phase = train.Phase("train", objectives.cross_entropy, {"data": train.Stream("all", epochs=2)},
                      train.Optimizer(0.1))
  original, _ = trainer.run(init, [phase], jax.random.key(1), "original")
  return dict(data=data, pools=pools, forget=forget, trainer=trainer, original=original)


def forget_prob_and_retain_acc(setup, params):
  probs = np.asarray(setup["trainer"].predict(params, "train")[0])
  f, y = setup["forget"], setup["data"].train_labels
  return float(probs[f, FORGET_CLASS].mean()), float(np.mean(probs[~f].argmax(1) == y[~f]))


# Short runs at learning rates that move the tiny model in one or two epochs.
RUNS = {
    "finetune": dict(epochs=2, learning_rate=0.1),
    "gradient_ascent": dict(epochs=1, learning_rate=0.1),
    "two_stage": dict(epochs=2, learning_rate=0.05),
    "random_labels": dict(epochs=1, learning_rate=0.05),
    "salun": dict(epochs=1, learning_rate=0.05),
    "l1_sparse": dict(epochs=2, learning_rate=0.1, alpha=1e-3),
    "neggrad_plus": dict(epochs=2, learning_rate=0.1, alpha=0.5),
    "scrub": dict(epochs=2, learning_rate=0.1, max_epochs=1),
    "boundary_shrinking": dict(epochs=1, learning_rate=0.1),
    # Class-grouped I_D batches keep the tiny model's I_f / I_D below 2.6 (data-set order: 13).
    "ssd": dict(alpha=1.5),
    "ssd_det": dict(alpha=1.5),
    "delete": dict(epochs=2, learning_rate=0.1),
    "fcs": dict(epochs=1, stage1_learning_rate=0.05, learning_rate=0.05),
}


def config(name, **override):
  s = METHODS[name].get_config()
  s.update({**RUNS[name], **override})
  return s


def test_runs_cover_every_method():
  assert set(RUNS) == set(METHODS)


# ---- NegGrad+ ----

def test_neggrad_plus_loss_is_alpha_retain_ce_minus_the_rest_forget_ce():
  r = np.random.default_rng(0)
  w = r.normal(size=(4, C)).astype(np.float32)
  batch = {"retain": fake_batch(r, 5), "forget": fake_batch(r, 3)}
  loss, aux = call(neggrad_plus.retain_minus_forget, {"w": w}, batch, hp={"alpha": 0.8})
  ce_r = np_ce(np_logits(batch["retain"], w), batch["retain"]["label"], batch["retain"]["mask"])
  ce_f = np_ce(np_logits(batch["forget"], w), batch["forget"]["label"], batch["forget"]["mask"])
  np.testing.assert_allclose(loss, 0.8 * ce_r - 0.2 * ce_f, rtol=1e-5)
  np.testing.assert_allclose([aux["retain_ce"], aux["forget_ce"]], [ce_r, ce_f], rtol=1e-5)


# ---- SCRUB ----

def np_distill_kl(student, teacher, mask, T):
  """DistillKL: sum softmax(t/T) (log softmax(t/T) - log softmax(s/T)) * T^2 / B (B real rows)."""
  log_q, log_p = np_log_softmax(teacher / T, -1), np_log_softmax(student / T, -1)
  return masked_mean(np.sum(np.exp(log_q) * (log_q - log_p), -1), mask) * T ** 2


def test_scrub_max_step_is_minus_distill_kl_and_min_step_adds_weighted_ce():
  r = np.random.default_rng(1)
  w = r.normal(size=(4, C)).astype(np.float32) * 3
  b = fake_batch(r, 4, teacher_logits=(r.normal(size=(6, C)) * 3).astype(np.float32))
  hp = dict(temperature=4.0, gamma=0.99, alpha=0.3)
  kl = np_distill_kl(np_logits(b, w), b["teacher_logits"].astype(np.float64), b["mask"], 4.0)
  ce = np_ce(np_logits(b, w), b["label"], b["mask"])
  loss, aux = call(scrub.max_step, {"w": w}, {"data": b}, hp=hp)
  np.testing.assert_allclose([loss, aux["kl"]], [-kl, kl], rtol=1e-5)
  loss, aux = call(scrub.min_step, {"w": w}, {"data": b}, hp=hp)
  np.testing.assert_allclose(loss, 0.99 * ce + 0.3 * kl, rtol=1e-5)
  np.testing.assert_allclose([aux["kl"], aux["ce"]], [kl, ce], rtol=1e-5)


@pytest.mark.parametrize("epochs, max_epochs, names", [
    (3, 2, ["max1", "min1", "max2", "min2", "min3"]),  # the large-scale notebook's msteps 2
    (2, 0, ["min1", "min2"]),
    (2, 5, ["max1", "min1", "max2", "min2"]),
])
def test_scrub_max_passes_only_in_epochs_up_to_max_epochs(epochs, max_epochs, names):
  s = scrub.get_config()
  s.epochs, s.max_epochs = epochs, max_epochs
  recipe = scrub.recipe(s)
  assert [p.name for p in recipe.phases] == names
  for p in recipe.phases:
    is_max = p.name.startswith("max")
    assert p.objective is (scrub.max_step if is_max else scrub.min_step)
    assert streams(p) == {"data": ("forget" if is_max else "retain", 1, None)}
    assert p.hparams["temperature"] == 4.0
    assert is_max or (p.hparams["gamma"], p.hparams["alpha"]) == (0.99, 0.001)
  # One SGD (one momentum buffer) across max and min passes, the notebook's settings.
  assert {sgd_values(p.optimizer) for p in recipe.phases} == {("sgd", 5e-4, 0.9, 5e-4, "constant")}


@pytest.mark.parametrize("name, pool", [("scrub", "all"), ("delete", "forget")])
def test_teacher_logits_table_is_the_original_on_its_pool(setup, name, pool):
  inputs = setup["trainer"].prepare(METHODS[name].recipe(config(name)), setup["original"])
  table = np.asarray(inputs.tables["teacher_logits"])
  idx = setup["pools"][pool]
  kernel, bias = np_head(setup["original"])
  want = np.zeros_like(table)
  want[idx] = np_inputs(setup["data"], idx) @ kernel + bias
  np.testing.assert_allclose(table, want, rtol=1e-5, atol=1e-5)


# ---- DELETE ----

def test_delete_target_is_the_teacher_softmax_without_the_true_class():
  r = np.random.default_rng(2)
  w = r.normal(size=(4, C + 2)).astype(np.float32) * 2
  b = fake_batch(r, 5, num_classes=C + 2,
                 teacher_logits=(r.normal(size=(6, C + 2)) * 3).astype(np.float32))
  loss, _ = call(delete.decoupled_kl, {"w": w}, {"data": b}, num_classes=C + 2)
  log_q = np_log_softmax(np_logits(b, w), -1)
  kl = np.zeros(6)
  for i, (t, y) in enumerate(zip(b["teacher_logits"].astype(np.float64), b["label"])):
    others = np.delete(np.arange(C + 2), y)  # p[y] = 0 contributes nothing
    p = np_softmax(t[others])
    kl[i] = np.sum(p * (np.log(p) - log_q[i, others]))
  np.testing.assert_allclose(loss, masked_mean(kl, b["mask"]), rtol=1e-5)


# ---- l1-sparse ----

def test_l1_sparse_alpha_decays_linearly_per_epoch():
  s = l1_sparse.get_config()
  s.epochs, s.alpha = 10, 2e-4
  phases = l1_sparse.recipe(s).phases
  np.testing.assert_allclose([p.hparams["alpha"] for p in phases], 2e-4 * (1 - np.arange(10) / 10),
                             rtol=1e-12)  # alpha, 0.9 alpha, ..., 0.1 alpha: never 0
  assert all(streams(p) == {"data": ("retain", 1, None)} for p in phases)
  assert {sgd_values(p.optimizer) for p in phases} == {("sgd", 0.01, 0.9, 5e-4, "constant")}


def test_l1_sparse_loss_adds_alpha_times_the_l1_norm_of_every_parameter():
  r = np.random.default_rng(3)
  params = {"w": r.normal(size=(4, C)).astype(np.float32),
            "unused": r.normal(size=(5,)).astype(np.float32)}  # counted even without a gradient
  b = fake_batch(r, 4)
  loss, aux = call(l1_sparse.ce_l1, params, {"data": b}, hp={"alpha": 0.03})
  l1 = np.abs(params["w"]).sum() + np.abs(params["unused"]).sum()
  np.testing.assert_allclose(aux["l1"], l1, rtol=1e-5)
  np.testing.assert_allclose(loss, np_ce(np_logits(b, params["w"]), b["label"], b["mask"]) + 0.03 * l1,
                             rtol=1e-5)


# ---- Boundary Shrinking ----

def np_fgsm_labels(x_BxD, y_B, kernel, bias, to_logits, bound):
  """Untargeted FGSM in [0, 1] pixels, rounded to 1/255, then the model's label (float32 pixels)."""
  h = to_logits(x_BxD.astype(np.float64))
  dz = np_softmax(h @ kernel + bias, -1)
  dz[np.arange(len(y_B)), y_B] -= 1
  sign = np.sign(dz @ kernel.T).astype(np.float32)  # d logits / d pixel is kernel (times a positive scale)
  x_adv = np.clip(x_BxD + np.float32(bound) * sign, 0, 1)
  x_adv = np.round(x_adv * np.float32(255)) / np.float32(255)
  return np.argmax(to_logits(x_adv.astype(np.float64)) @ kernel + bias, -1)


def test_boundary_shrinking_neighbour_is_the_label_after_fgsm():
  r = np.random.default_rng(4)
  w = r.normal(size=(4, C)).astype(np.float32)
  b = fake_batch(r, 6)
  got, _ = call(boundary_shrinking.neighbour_labels, {"w": w}, {"data": b},
                hp={"bound": 0.3})
  x = b["image"].reshape(6, -1)
  want = np_fgsm_labels(x, b["label"], w.astype(np.float64), 0.0, lambda v: v, 0.3)
  np.testing.assert_array_equal(got["neighbour"], want)
  assert np.any(want != np.argmax(x @ w, -1))  # the attack moved some labels
  # Then plain cross-entropy against those labels.
  loss, _ = call(boundary_shrinking.shrink, {"w": w}, {"data": {**b, "neighbour": want}})
  np.testing.assert_allclose(loss, np_ce(np_logits(b, w), want, b["mask"]), rtol=1e-5)


def test_boundary_shrinking_table_holds_fgsm_labels_of_the_forget_set(setup):
  data, idx = setup["data"], setup["pools"]["forget"]
  inputs = setup["trainer"].prepare(boundary_shrinking.recipe(config("boundary_shrinking", bound=0.3)),
                                    setup["original"])
  table = np.asarray(inputs.tables["neighbour"])
  kernel, bias = np_head(setup["original"])
  x = data.train_images[idx].reshape(len(idx), -1).astype(np.float32) / np.float32(data.pixel_max)
  want = np_fgsm_labels(x, data.train_labels[idx], kernel, bias, lambda v: (v - 0.5) / 0.5, 0.3)
  np.testing.assert_array_equal(table[idx], want)
  assert np.any(want != FORGET_CLASS)  # some neighbours are other classes
  np.testing.assert_array_equal(np.delete(table, idx), 0)  # rows outside the pool


# ---- SSD ----

def np_dampen(theta, i_f, i_d, alpha, lam):
  selected = i_f > alpha * i_d
  factor = np.minimum(1.0, lam * i_d / np.where(selected, i_f, 1.0))
  return np.where(selected, theta * factor, theta), selected, selected & (lam * i_d >= i_f)


@pytest.mark.parametrize("alpha, lam", [(5.0, 1.0), (2.0, 10.0)])  # the second hits min(1, .)
def test_ssd_dampens_weights_much_more_important_to_the_forget_set(alpha, lam):
  r = np.random.default_rng(5)
  shapes = {"a": (6, 7), "b": (40,)}
  params = {k: r.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  i_f = {k: (r.exponential(size=s) * (r.random(s) < 0.9)).astype(np.float32) for k, s in shapes.items()}
  i_d = {k: (r.exponential(size=s) * 0.2 * (r.random(s) < 0.8)).astype(np.float32)
         for k, s in shapes.items()}  # zeros: I_D = 0 < I_f zeroes the weight; both 0: kept
  got = call(ssd.dampen, params, hp={"alpha": alpha, "dampening": lam},
             frozen={"forget": i_f, "full": i_d})
  clipped_any = False
  for k in shapes:
    want, selected, clipped = np_dampen(params[k].astype(np.float64), i_f[k].astype(np.float64),
                                        i_d[k].astype(np.float64), alpha, lam)
    np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7)
    assert 0 < selected.sum() < selected.size
    clipped_any |= clipped.any()
  assert clipped_any == (lam > alpha)  # a factor above 1 needs lambda > alpha


def reference_full_order(labels, forget_class):
  """SSD's full_train_dl order, built as its loaders are: classwise lists (get_classwise_ds),
  the retain set class by class (build_retain_forget_sets), then ConcatDataset(retain, forget)."""
  classwise = {c: [] for c in range(int(labels.max()) + 1)}
  for i, y in enumerate(labels):
    classwise[int(y)].append(i)
  retain = [i for c in classwise if c != forget_class for i in classwise[c]]
  return np.array(retain + classwise[forget_class])


def np_importance(setup, order):
  """SSD's calc_importance over batches of `order`: the squared batch-mean CE gradient,
  averaged over the batches."""
  kernel, bias = np_head(setup["original"])
  y = setup["data"].train_labels
  sq = [np.zeros_like(kernel), np.zeros_like(bias)]
  batches = pool_batches(order)
  for idx in batches:
    for acc, g in zip(sq, np_ce_grads(kernel, bias, np_inputs(setup["data"], idx), y[idx])):
      acc += g ** 2
  return {"kernel": sq[0] / len(batches), "bias": sq[1] / len(batches)}


def np_example_importance(setup, idx):
  """SSD-Det's calc_importance: each example's CE gradient alone, squared, averaged over examples."""
  kernel, bias = np_head(setup["original"])
  y = setup["data"].train_labels
  sq = [np.zeros_like(kernel), np.zeros_like(bias)]
  for i in idx:
    for acc, g in zip(sq, np_ce_grads(kernel, bias, np_inputs(setup["data"], [i]), y[[i]])):
      acc += g ** 2
  return {"kernel": sq[0] / len(idx), "bias": sq[1] / len(idx)}


def assert_head_close(got, want, **kw):
  for k in want:
    np.testing.assert_allclose(got["head"][k], want[k], **kw)


def test_ssd_full_pool_is_the_reference_loader_order():
  r = np.random.default_rng(7)
  labels = r.integers(0, 5, 200)
  forget = labels == 2
  scene = scenario.Scenario("class", (2,), forget, np.zeros(0, bool), sweep_classes=labels)
  np.testing.assert_array_equal(scene.pools()[ssd.FULL_POOL], reference_full_order(labels, 2))
  # Sub-class: the reference keys its classwise lists on the fine label, not the coarse one.
  fine = r.integers(0, 10, 200)
  scene = scenario.Scenario("subclass", (1,), fine == 3, np.zeros(0, bool),
                            sweep_classes=fine)
  np.testing.assert_array_equal(scene.pools()[ssd.FULL_POOL], reference_full_order(fine, 3))
  # Random subset: the retain set in data-set order, then the forget set.
  scene = scenario.Scenario("random", (), forget, np.zeros(0, bool))
  np.testing.assert_array_equal(scene.pools()[ssd.FULL_POOL],
                                np.r_[np.flatnonzero(~forget), np.flatnonzero(forget)])


def test_ssd_importances_and_edit_match_numpy(setup):
  t = setup["trainer"]
  s = config("ssd")
  order = {"forget": np.flatnonzero(setup["forget"]),
           ssd.FULL_POOL: reference_full_order(setup["data"].train_labels, FORGET_CLASS)}
  got = {pool: ssd.importance(t, setup["original"], pool) for pool in order}
  for pool, idx in order.items():
    assert_head_close(got[pool], np_importance(setup, idx), rtol=1e-4, atol=1e-10)
  # The order matters: data-set order (the pool "all") gives another I_D.
  mixed = np_importance(setup, np.arange(len(setup["forget"])))
  assert np.max(np.abs(mixed["kernel"] / got[ssd.FULL_POOL]["head"]["kernel"] - 1)) > 0.05
  params, _ = t.run(setup["original"], ssd.recipe(s), jax.random.key(0), "ssd")
  n_selected = 0
  for k in ("kernel", "bias"):
    i_f, i_d = (np.asarray(got[p]["head"][k]) for p in ("forget", ssd.FULL_POOL))
    theta = np.asarray(setup["original"]["params"]["head"][k])
    want, selected, _ = np_dampen(theta, i_f, i_d, np.float32(s.alpha), np.float32(s.dampening))
    np.testing.assert_allclose(params["params"]["head"][k], want, rtol=1e-6, atol=1e-8)
    n_selected += selected.sum()
  assert n_selected > 0


@pytest.mark.parametrize("batch_size", [5, 8, 64])  # padded rows; partial last batch; one batch
def test_ssd_det_importance_is_the_mean_squared_per_example_gradient(setup, batch_size):
  t, pools = setup["trainer"], setup["pools"]
  for pool in ("forget", ssd.FULL_POOL, "all"):
    got = ssd_det.importance(t, setup["original"], pool, batch_size)
    assert_head_close(got, np_example_importance(setup, pools[pool]), rtol=1e-4, atol=1e-10)


def test_ssd_det_edit_dampens_with_per_example_importances(setup):
  s = config("ssd_det")
  params, _ = setup["trainer"].run(setup["original"], ssd_det.recipe(s), jax.random.key(0),
                                   "ssd_det")
  i_f = np_example_importance(setup, np.flatnonzero(setup["forget"]))
  i_d = np_example_importance(setup, np.arange(len(setup["forget"])))
  n_selected = 0
  for k in ("kernel", "bias"):
    theta = np.asarray(setup["original"]["params"]["head"][k], np.float64)
    want, selected, _ = np_dampen(theta, i_f[k], i_d[k], s.alpha, s.dampening)
    np.testing.assert_allclose(params["params"]["head"][k], want, rtol=1e-5, atol=1e-7)
    n_selected += selected.sum()
  assert n_selected > 0


# ---- SalUn ----

@pytest.mark.parametrize("fraction", [0.1, 0.29, 0.37, 0.5, 1.0])
def test_saliency_mask_keeps_the_largest_gradients_across_all_leaves(fraction):
  r = np.random.default_rng(6)
  shapes = {"a": (7, 5), "b": {"c": (11,), "d": (2, 3, 4)}}
  n = 35 + 11 + 24
  values = (r.permutation(n) + 1.0) * r.choice([-1.0, 1.0], n)  # distinct |g|, both signs
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  sizes = np.cumsum([0] + [int(np.prod(s)) for s in leaves])
  grads = jax.tree.unflatten(treedef, [values[a:b].reshape(s).astype(np.float32)
                                       for a, b, s in zip(sizes[:-1], sizes[1:], leaves)])
  mask = salun.saliency_mask(grads, fraction)
  k = int(n * fraction)  # generate_mask.py: int(N * frac), in double precision (0.29 -> 20)
  want = np.zeros(n)
  want[np.argsort(-np.abs(values))[:k]] = 1.0
  got = np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(mask)])
  np.testing.assert_array_equal(got, want)
  assert got.sum() == k


def test_salun_mask_ranks_the_summed_forget_gradient(setup):
  s = config("salun")
  inputs = setup["trainer"].prepare(salun.recipe(s), setup["original"])
  kernel, bias = np_head(setup["original"])
  y = setup["data"].train_labels
  g = [np.zeros_like(kernel), np.zeros_like(bias)]
  for idx in pool_batches(setup["pools"]["forget"]):  # sum (not mean) over batches of grad(-CE)
    for acc, gi in zip(g, np_ce_grads(kernel, bias, np_inputs(setup["data"], idx), y[idx])):
      acc -= gi
  flat = np.sort(np.abs(np.concatenate([x.ravel() for x in g])))[::-1]
  k = int(flat.size * s.mask_fraction)
  assert flat[k - 1] > flat[k] * (1 + 1e-4)  # a clear threshold: float32 cannot reorder it
  for name, gi in zip(("kernel", "bias"), g):
    np.testing.assert_array_equal(inputs.update_mask["head"][name], np.abs(gi) >= flat[k - 1])


@pytest.mark.parametrize("name", ["random_labels", "salun"])
def test_random_labels_epochs_are_a_forget_pass_then_a_retain_pass(name):
  s = METHODS[name].get_config()
  s.epochs = 3
  phases = METHODS[name].recipe(s).phases
  assert [(p.objective, streams(p), p.sign) for p in phases] == [
      (random_labels.random_label_ce, {"data": ("forget", 1, None)}, 1.0),
      (objectives.cross_entropy, {"data": ("retain", 1, None)}, 1.0)] * 3
  # One SGD across both passes and all epochs (the SalUn README's RL setting).
  assert {sgd_values(p.optimizer) for p in phases} == {("sgd", 0.013, 0.9, 5e-4, "constant")}


def test_random_labels_are_uniform_over_all_classes_and_fresh_for_every_key():
  K, B, n_real = 300, 24, 20
  true_B = (np.arange(B) % C).astype(np.int32)
  batch = {"data": dict(image=np.zeros((B, 1), np.float32), label=true_B,
                        mask=(np.arange(B) < n_real).astype(np.float32))}

  def grad_wrt_logits(key):
    # With the logits as the parameters and all zero, dCE/dz = (1/C - onehot(drawn)) / n_real.
    ctx = train.Context(apply=lambda p, x, **kw: (p, None), rng=key, progress=jnp.float32(0), hp={},
                        inputs=train.Inputs(), num_classes=C)
    return jax.grad(lambda z: random_labels.random_label_ce(ctx, z, batch)[0])(jnp.zeros((B, C)))

  g_KxBxC = np.asarray(jax.jit(jax.vmap(grad_wrt_logits))(jax.random.split(jax.random.key(0), K)))
  drawn_KxB = g_KxBxC.argmin(-1)[:, :n_real]
  np.testing.assert_allclose(g_KxBxC[:, :n_real], (1 / C - np.eye(C)[drawn_KxB]) / n_real, atol=1e-7)
  np.testing.assert_array_equal(g_KxBxC[:, n_real:], 0)  # padding rows draw nothing that counts
  counts = np.bincount(drawn_KxB.ravel(), minlength=C)
  assert stats.chisquare(counts).pvalue > 1e-3, counts
  # Independent of the true label, which itself is drawn 1 time in C (RL.py: randint(0, C)).
  table = np.array([np.bincount(drawn_KxB[:, true_B[:n_real] == c].ravel(), minlength=C)
                    for c in range(C)])
  assert stats.chi2_contingency(table).pvalue > 1e-3, table
  assert stats.binomtest(int(np.trace(table)), int(table.sum()), 1 / C).pvalue > 1e-3
  assert all(len(np.unique(drawn_KxB[:, i])) == C for i in range(n_real))  # fresh draws per key


def test_salun_leaves_weights_outside_the_mask_bitwise_unchanged(setup):
  t = setup["trainer"]
  recipe = salun.recipe(config("salun", weight_decay=0.1))  # decay would move every weight
  mask = t.prepare(recipe, setup["original"]).update_mask
  params, _ = t.run(setup["original"], recipe, jax.random.key(3), "salun")
  kept = 0
  for new, old, m in zip(*(jax.tree.leaves(x) for x in (params, setup["original"], mask))):
    new, old, m = np.asarray(new), np.asarray(old), np.asarray(m) > 0
    np.testing.assert_array_equal(new[~m], old[~m])
    assert np.all(new[m] != old[m])
    kept += (~m).sum()
  assert kept > 0


def test_salun_momentum_outside_the_mask_stays_zero(setup):
  t = setup["trainer"]
  recipe = salun.recipe(config("salun", weight_decay=0.1))
  inputs = t.prepare(recipe, setup["original"])
  stepper = t.stepper(recipe.phases[1], setup["original"], inputs)  # its chunk, as run() runs it
  stepper()
  opt_state = stepper.state()["opt"]
  (trace,) = [s.trace for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState)) if isinstance(s, optax.TraceState)]
  for mom, m in zip(jax.tree.leaves(trace), jax.tree.leaves(inputs.update_mask)):
    mom, m = np.asarray(mom), np.asarray(m) > 0
    assert np.any(mom[m] != 0)
    np.testing.assert_array_equal(mom[~m], 0)


# ---- FCS, two-stage and the single-phase methods ----

def test_fcs_stage1_then_forget_and_retain_rounds_with_three_optimizers(setup):
  s = fcs.get_config()
  s.epochs = 3
  phases = fcs.recipe(s).phases
  assert [p.name for p in phases] == ["stage1", "forget0", "retain0", "forget1", "retain1",
                                      "forget2", "retain2"]
  stage1, forget_rounds, retain_rounds = phases[0], phases[1::2], phases[2::2]
  assert (stage1.objective, streams(stage1)) == (objectives.kl_uniform, {"data": ("forget", 1, None)})
  assert (stage1.optimizer.name, sgd_values(stage1.optimizer)) == ("stage1", ("sgd", 5e-3, 0.9, 0.0, "constant"))
  for p in forget_rounds:  # each forget batch paired with the next batch of a cycling retain stream
    assert (p.objective, streams(p), p.hparams) == (
        fcs.contrastive, {"forget": ("forget", 1, None), "retain": ("retain", None, None)},
        {"temperature": 1.15})
    assert (p.optimizer.name, sgd_values(p.optimizer), p.optimizer.final_learning_rate) == (
        "forget", ("sgd", 3e-4, 0.9, 0.0, "cosine"), 1e-6)
  for p in retain_rounds:
    assert (p.objective, streams(p)) == (objectives.cross_entropy, {"data": ("retain", 1, None)})
    assert (p.optimizer.name, sgd_values(p.optimizer)) == ("retain", ("sgd", 4e-3, 0.9, 1e-2, "constant"))
  # The forget optimizer's cosine spans every forget-round step of every epoch.
  total = sum(setup["trainer"].steps_in(p) for p in forget_rounds)
  assert total == 3 * -(-len(setup["pools"]["forget"]) // BATCH)
  t = np.arange(total + 1)
  np.testing.assert_allclose(np.asarray(forget_rounds[0].optimizer.learning_rates(t, total)),
                             1e-6 + (3e-4 - 1e-6) * (1 + np.cos(np.pi * t / total)) / 2, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(retain_rounds[0].optimizer.learning_rates(t, total)), 4e-3)


def _sum_of_params(ctx, params, batch):
  del ctx, batch
  return sum(jnp.sum(x) for x in jax.tree.leaves(params)), {}


def test_fcs_forget_rounds_follow_one_cosine_across_epochs(setup):
  # FCS's phases with a probe objective of gradient 1 and no momentum in the forget rounds
  # (sign 0 elsewhere): every weight then moves by minus the sum of the rates they used.
  s = fcs.get_config()
  s.epochs = 3
  phases = []
  for p in fcs.recipe(s).phases:
    opt = dataclasses.replace(p.optimizer, momentum=0.0, weight_decay=0.0)
    phases.append(dataclasses.replace(p, objective=_sum_of_params, optimizer=opt,
                                      sign=float(p.name.startswith("forget"))))
  params, _ = setup["trainer"].run(setup["original"], phases, jax.random.key(0), "fcs-lr")
  T = 3 * -(-len(setup["pools"]["forget"]) // BATCH)
  t = np.arange(T)
  lr_sum = np.sum(1e-6 + (3e-4 - 1e-6) * (1 + np.cos(np.pi * t / T)) / 2)
  for new, old in zip(jax.tree.leaves(params), jax.tree.leaves(setup["original"])):
    np.testing.assert_allclose(np.asarray(new) - np.asarray(old), -lr_sum, rtol=1e-3, atol=1e-6)


def test_fcs_contrastive_uses_each_streams_own_padding():
  r = np.random.default_rng(7)
  w = r.normal(size=(4, C)).astype(np.float32) * 2
  batch = {"forget": fake_batch(r, 4), "retain": fake_batch(r, 5)}
  loss, _ = call(fcs.contrastive, {"w": w}, batch, hp={"temperature": 1.15})
  z_f, z_r = np_logits(batch["forget"], w)[:4], np_logits(batch["retain"], w)[:5]
  np.testing.assert_allclose(loss, np.mean(-np_log_softmax(z_f @ z_r.T / 1.15, -1)), rtol=1e-5)


EPOCHS = 4
# name -> [(objective, streams, sign)] of its recipe at `EPOCHS` epochs (defaults otherwise).
SINGLE = {
    "finetune": [(objectives.cross_entropy, {"data": ("retain", EPOCHS, None)}, 1.0)],
    "gradient_ascent": [(objectives.cross_entropy, {"data": ("forget", EPOCHS, None)}, -1.0)],
    "neggrad_plus": [(neggrad_plus.retain_minus_forget,  # the retain set drives, forget cycles
                      {"retain": ("retain", EPOCHS, None), "forget": ("forget", None, None)}, 1.0)],
    "boundary_shrinking": [(boundary_shrinking.shrink, {"data": ("forget", EPOCHS, None)}, 1.0)],
    "delete": [(delete.decoupled_kl, {"data": ("forget", EPOCHS, None)}, 1.0)],
    "two_stage": [(objectives.kl_uniform, {"data": ("forget", 1, 1)}, 1.0),
                  (two_stage.contrastive_retain,
                   {"forget": ("forget", EPOCHS, None), "retain": ("retain", None, None)}, 1.0)],
}
OPTIMIZERS = {  # the reference defaults
    "finetune": train.Optimizer(0.01, 0.9, 5e-4), "gradient_ascent": train.Optimizer(1e-4, 0.9, 5e-4),
    "neggrad_plus": train.Optimizer(0.01, 0.9, 0.0), "boundary_shrinking": train.Optimizer(0.01, 0.9, 5e-4),
    "delete": train.Optimizer(1e-4, 0.9, 0.0), "two_stage": train.Optimizer(1e-4, 0.9, 0.0),
}


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_recipe_phases_read_the_reference_pools(name):
  s = METHODS[name].get_config()
  s.epochs = EPOCHS
  phases = METHODS[name].recipe(s).phases
  assert [(p.objective, streams(p), p.sign) for p in phases] == SINGLE[name]
  assert len({p.optimizer for p in phases}) == 1  # one optimizer state
  assert sgd_values(phases[0].optimizer) == sgd_values(OPTIMIZERS[name])


@pytest.mark.parametrize("module", [ssd, ssd_det])
def test_ssd_trains_nothing_and_edits_with_its_hyperparameters(module):
  recipe = module.recipe(module.get_config())
  assert recipe.phases == [] and recipe.edit is ssd.dampen
  assert dict(recipe.edit_hparams) == {"alpha": 5.0, "dampening": 1.0}  # ViT full-class values


# ---- every method: a short run moves the model the right way; other values never recompile ----

@pytest.mark.parametrize("name", list(METHODS))
def test_short_run_forgets_and_keeps_the_retain_set(setup, name):
  recipe = METHODS[name].recipe(config(name))
  params, _ = setup["trainer"].run(setup["original"], recipe, jax.random.key(2), name)
  p_before, acc_before = forget_prob_and_retain_acc(setup, setup["original"])
  p_after, acc_after = forget_prob_and_retain_acc(setup, params)
  assert p_after < p_before - 0.05, (p_before, p_after)
  if any(st.pool == "retain" for p in recipe.phases for st in p.streams.values()):
    assert acc_after >= acc_before - 0.05, (acc_before, acc_after)


def other_values(s):
  """Every float setting changed (halved, or 1e-3 where 0) and one more epoch."""
  s = s.copy_and_resolve_references()
  for k, v in s.items():
    if isinstance(v, float):
      s[k] = v / 2 if v else 1e-3
  if "epochs" in s:
    s.epochs += 1
  return s


@pytest.mark.parametrize("name", list(METHODS))
def test_other_hyperparameters_reuse_every_compiled_step(setup, name):
  t, mod = setup["trainer"], METHODS[name]
  first, _ = t.run(setup["original"], mod.recipe(config(name)), jax.random.key(4), name)
  traces = t.num_traces
  second, log = t.run(setup["original"], mod.recipe(other_values(config(name))), jax.random.key(4),
                      name)
  assert t.num_traces == traces
  assert log["compile_seconds"] == 0.0  # no table, sweep or edit compiled either
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))  # the values arrive
