"""A stateful model (ResNet with BatchNorm) through the shared loop: state threading, modes,
1 vs 8 devices, resume, and every method on a tiny ResNet.

The ResNet itself (forward, gradients, running statistics) is checked against PyTorch in
test_resnet.py; here the loop's part: which pass updates the running statistics, in which
order, and that padding, sweeps, evaluation and snapshots treat them as the references do.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import objectives, scenario, steps, train
from jaxunlearn.methods import METHODS, two_stage
from jaxunlearn.models import base, resnet
from tests.test_methods import FORGET_CLASS, config, tiny_data
from tests.test_train import one_device_mesh


def tiny_resnet(num_classes=3):
  net = resnet.ResNet(num_classes=num_classes, stage_sizes=(1, 1), width=4)
  return base.Model(net, image_size=None, stateful=True)


def make_trainer(data, *, mesh=None, batch_size=8, chunk=4):
  forget = data.train_labels == FORGET_CLASS
  pools = scenario.Scenario("class", (FORGET_CLASS,), forget, data.test_labels == FORGET_CLASS,
                            sweep_classes=data.train_labels).pools()
  model = tiny_resnet(data.num_classes)
  variables = model.init(jax.random.key(0), (1, *data.train_images.shape[1:]))
  t = train.Trainer(model, data, pools, batch_size=batch_size, steps_per_chunk=chunk,
                    eval_batch_size=16, mesh=mesh, progress=False)
  return t, variables, pools


def model_input(t, images):
  """What the loop hands the model: (x / pixel_max - 0.5) / 0.5, at the stored size."""
  del t
  return (jnp.asarray(images, jnp.float32) / 16.0 - 0.5) / 0.5


def train_mode_state(model, variables, x):
  """The running statistics after one train-mode pass of `model` over x (all rows real)."""
  _, _, state = model.apply(variables, x, train=True)
  return {"params": variables["params"], **state}


def assert_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def _frozen_lr():
  return train.Optimizer(0.0, momentum=0.0)  # parameters stay: only the statistics move


def test_each_train_mode_pass_updates_the_statistics_in_call_order():
  data = tiny_data()
  t, variables, pools = make_trainer(data, batch_size=64)  # one (padded) batch per pool
  phase = train.Phase("p", two_stage.contrastive_retain,
                      {"forget": train.Stream("forget", epochs=1), "retain": train.Stream("retain")},
                      _frozen_lr(), hparams={"temperature": 1.15})
  got, _ = t.run(variables, [phase], jax.random.key(0), "x")
  # Forget then retain, each over its real rows only (a batch statistic is order-free).
  want = train_mode_state(t.model, variables, model_input(t, data.train_images[pools["forget"]]))
  want = train_mode_state(t.model, want, model_input(t, data.train_images[pools["retain"]]))
  assert_close(got["batch_stats"], want["batch_stats"], rtol=1e-5, atol=1e-6)
  # The other order gives other statistics: the order is what is tested.
  other = train_mode_state(t.model, variables, model_input(t, data.train_images[pools["retain"]]))
  other = train_mode_state(t.model, other, model_input(t, data.train_images[pools["forget"]]))
  assert not np.allclose(got["batch_stats"]["stem_bn"]["mean"], other["batch_stats"]["stem_bn"]["mean"])


def test_padding_rows_never_enter_a_batch_statistic():
  data = tiny_data()
  t, variables, pools = make_trainer(data, batch_size=64)
  phase = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("forget", epochs=1)},
                      _frozen_lr())
  got, _ = t.run(variables, [phase], jax.random.key(0), "x")  # 15 real rows of 64
  want = train_mode_state(t.model, variables, model_input(t, data.train_images[pools["forget"]]))
  assert_close(got["batch_stats"], want["batch_stats"], rtol=1e-5, atol=1e-6)


def _logits(ctx, params, batch):
  b = batch["data"]
  return {"logits": ctx.apply(params, b["image"], mask=b["mask"])[0]}, ()


def test_sweeps_and_evaluation_run_in_eval_mode_and_keep_the_statistics():
  data = tiny_data()
  t, variables, pools = make_trainer(data)
  trained, _ = t.run(variables, [train.Phase("p", objectives.cross_entropy,
                                             {"data": train.Stream("all", epochs=3)},
                                             train.Optimizer(0.1))], jax.random.key(0), "x")
  x = model_input(t, data.train_images)
  want, _, state = t.model.apply(trained, x, train=False)
  assert_close(state, {"batch_stats": trained["batch_stats"]}, rtol=0, atol=0)
  tables, _ = t.sweep(_logits, trained, "all")
  np.testing.assert_allclose(tables["logits"], want, rtol=1e-5, atol=1e-5)
  probs, _ = t.predict(trained, "train")
  np.testing.assert_allclose(probs, jax.nn.softmax(want), rtol=1e-5, atol=1e-6)
  # Batch statistics would give other outputs: the modes are what is tested.
  batch_mode, _, _ = t.model.apply(trained, x, train=True)
  assert not np.allclose(batch_mode, want, atol=1e-3)


def test_one_device_and_eight_devices_agree_with_batchnorm():
  assert jax.device_count() == 8
  data = tiny_data()
  phases = [train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=3)},
                        train.Optimizer(0.1, weight_decay=5e-4))]
  outs = []
  for mesh in (one_device_mesh(), None):
    t, variables, _ = make_trainer(data, mesh=mesh)
    out, log = t.run(variables, phases, jax.random.key(1), "x")
    outs.append((np.array(log["loss"]), out))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
  assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)


class _Memory:
  """Snapshots kept in memory: one at the second chunk boundary."""

  def __init__(self):
    self.calls, self.saved = 0, None

  def due(self):
    self.calls += 1
    return self.calls == 2

  def save(self, position, arrays, log):
    self.saved = dict(position, arrays=jax.tree.map(np.array, arrays), loss=list(log["loss"]))


def test_resume_from_a_snapshot_is_bitwise_with_the_model_state():
  data = tiny_data()
  t, variables, _ = make_trainer(data, chunk=2)
  recipe = two_stage.recipe(two_stage.get_config())
  whole, log = t.run(variables, recipe, jax.random.key(3), "x")
  memory = _Memory()
  t.run(variables, recipe, jax.random.key(3), "x", snapshots=memory)
  snap = memory.saved
  assert snap is not None and "batch_stats" in snap["arrays"]["model_state"]
  template = t.snapshot_template(variables, {p.optimizer.name: p.optimizer for p in recipe.phases})
  arrays = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), snap["arrays"], template)
  resumed, log2 = t.run(variables, recipe, jax.random.key(3), "x",
                        resume=dict(snap, arrays=arrays))
  assert log2["loss"] == log["loss"]
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)


@pytest.fixture(scope="module")
def resnet_setup():
  data = tiny_data()
  t, variables, pools = make_trainer(data)
  phase = train.Phase("train", objectives.cross_entropy, {"data": train.Stream("all", epochs=6)},
                      train.Optimizer(0.05))
  original, _ = t.run(variables, [phase], jax.random.key(1), "original")
  return dict(data=data, pools=pools, trainer=t, original=original)


def _whole_pools(t, phase, inputs, pools):
  """Each stream's batch: its whole pool, padded to a multiple of the device count."""
  batch = {}
  for name, stream in phase.streams.items():
    idx = pools[stream.pool]
    width = t.data.width(len(idx))
    mask = (np.arange(width) < len(idx)).astype(np.float32)
    batch[name] = t.data.gather(t.train, jnp.asarray(np.pad(idx, (0, width - len(idx)))),
                                jnp.asarray(mask), inputs.tables)
  return batch


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_moves_a_tiny_resnet_the_right_way(resnet_setup, name):
  """Each phase's update, as its step computes it (train mode, prepare inputs, hp), lowers
  that phase's signed objective on its whole pools; then the whole recipe runs, finite."""
  s, t = resnet_setup, resnet_setup["trainer"]
  recipe = METHODS[name].recipe(config(name))
  inputs = t.prepare(recipe, s["original"])
  state = {"batch_stats": s["original"]["batch_stats"]}
  for phase in recipe.phases[:2]:
    batch = _whole_pools(t, phase, inputs, s["pools"])
    hp = {k: jnp.float32(v) for k, v in phase.hparams.items()}

    def signed(params):
      ctx = steps.context(t.env, [state], jax.random.key(0), jnp.int32(0), jnp.int32(1), hp,
                          inputs, default_train=True)
      return phase.sign * phase.objective(ctx, params, batch)[0]

    params = s["original"]["params"]
    loss, grads = jax.jit(jax.value_and_grad(signed))(params)
    mask = inputs.update_mask if inputs.update_mask is not None else jax.tree.map(
        lambda g: 1.0, grads)
    stepped = jax.tree.map(lambda p, g, m: p - 1e-3 * g * m, params, grads, mask)
    assert float(jax.jit(signed)(stepped)) < float(loss), (phase.name, loss)
  out, log = t.run(s["original"], recipe, jax.random.key(2), name)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out["params"]),
                                                      jax.tree.leaves(s["original"]["params"])))
