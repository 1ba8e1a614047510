"""Optimizers against torch.optim, schedules against torch's schedulers and numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import optimizers, train
from jaxunlearn.methods import base


def _run_ours(opt: optimizers.Optimizer, p0, grads, total):
  tx = optimizers.transform(opt.kind)
  params = {"w": jnp.asarray(p0)}
  state = tx.init(params)
  lrs = opt.learning_rates(np.arange(len(grads)), total)
  for lr, g in zip(lrs, grads):
    state.hyperparams.update(learning_rate=jnp.float32(lr), **opt.hyperparams())
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params["w"])


def _run_torch(kind, p0, grads, **kw):
  import torch
  w = torch.tensor(p0, requires_grad=True)
  cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
  ref = cls([w], **kw)
  for g in grads:
    w.grad = torch.tensor(g)
    ref.step()
  return w.detach().numpy()


@pytest.mark.parametrize("kind, wd", [("sgd", 0.01), ("adam", 0.0), ("adam", 0.05), ("adamw", 0.05)])
def test_each_kind_matches_torch(kind, wd):
  r = np.random.default_rng(0)
  p0, grads = r.normal(size=(7,)).astype(np.float32), r.normal(size=(6, 7)).astype(np.float32)
  opt = optimizers.Optimizer(0.01, momentum=0.8, weight_decay=wd, kind=kind, beta2=0.99, eps=1e-6)
  got = _run_ours(opt, p0, grads, total=6)
  kw = dict(lr=0.01, weight_decay=wd)
  kw.update(momentum=0.8) if kind == "sgd" else kw.update(betas=(0.8, 0.99), eps=1e-6)
  np.testing.assert_allclose(got, _run_torch(kind, p0, grads, **kw), rtol=2e-5, atol=1e-6)


def test_step_decay_matches_torch_multisteplr():
  import torch
  # 10 epochs of 3 steps each, x0.1 at epochs 4 and 7 (Unlearn-Sparse: 182 epochs, 91 and 136).
  opt = optimizers.Optimizer(0.1, schedule="step", decay_epochs=(4, 7), epochs=10)
  got = opt.learning_rates(np.arange(30), 30)
  w = torch.zeros(1, requires_grad=True)
  ref = torch.optim.SGD([w], lr=0.1)
  sched = torch.optim.lr_scheduler.MultiStepLR(ref, milestones=[4, 7], gamma=0.1)
  want = []
  for _ in range(10):
    want += [ref.param_groups[0]["lr"]] * 3
    ref.step()
    sched.step()
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_warmup_then_cosine_numpy_formula():
  opt = optimizers.Optimizer(0.2, schedule="cosine", final_learning_rate=0.002, warmup_epochs=1,
                             epochs=5)
  t = np.arange(50)  # 10 steps per epoch: warm-up over the first 10
  got = opt.learning_rates(t, 50)
  np.testing.assert_allclose(got[:10], 0.2 * (t[:10] + 1) / 10, rtol=1e-6)
  s = (t[10:] - 10) / 40
  np.testing.assert_allclose(got[10:], 0.002 + (0.2 - 0.002) * (1 + np.cos(np.pi * s)) / 2, rtol=1e-5)


def test_constant_is_the_default_and_final_rate_alone_means_cosine():
  assert optimizers.Optimizer(0.1).schedule_kind == "constant"
  assert optimizers.Optimizer(0.1, final_learning_rate=0.0).schedule_kind == "cosine"
  np.testing.assert_array_equal(optimizers.Optimizer(0.1).learning_rates(np.arange(5), 5),
                                np.float32(0.1))


def test_a_section_describes_its_optimizer():
  s = base.section(learning_rate=0.1, epochs=182, weight_decay=5e-4)
  s.optimizer, s.schedule, s.decay_epochs, s.beta2 = "adamw", "step", "91,136", 0.98
  opt = base.optimizer(s, "main")
  assert (opt.kind, opt.name, opt.schedule_kind, opt.decay_epochs, opt.epochs, opt.beta2) == (
      "adamw", "main", "step", (91.0, 136.0), 182, 0.98)


def test_kinds_and_values_are_traced_not_compiled_in():
  from tests.test_train import ce_phase, tiny_data, tiny_trainer
  t, variables = tiny_trainer(tiny_data())
  for kind in ("adam", "adamw"):
    for lr, wd, b2 in ((1e-3, 0.0, 0.999), (3e-3, 0.01, 0.9)):
      opt = optimizers.Optimizer(lr, weight_decay=wd, kind=kind, beta2=b2, schedule="step",
                                 decay_epochs=(1,), epochs=2)
      phase = train.Phase("p", ce_phase("all", 2).objective, ce_phase("all", 2).streams, opt)
      _, log = t.run(variables, [phase], jax.random.key(0), "x")
      assert np.all(np.isfinite(log["loss"]))
  assert t.num_traces == 2  # one compiled step per kind, whatever its values and schedule
