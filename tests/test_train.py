"""The shared training loop: epoch semantics, compile-once, chunking, data parallelism."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxunlearn import datasets, losses, objectives, optimizers, train
from jaxunlearn.models import vit as model_lib
from jaxunlearn.methods import two_stage


def tiny_data(n_train=37, n_test=11, classes=3, seed=0):
  r = np.random.default_rng(seed)
  y = np.r_[np.arange(classes), r.integers(0, classes, n_train - classes)].astype(np.int32)
  # Class-dependent images so a model can learn something.
  x = (r.integers(0, 4, (n_train, 4, 4, 1)) + 4 * y[:, None, None, None]).astype(np.uint8)
  yt = r.integers(0, classes, n_test).astype(np.int32)
  xt = (r.integers(0, 4, (n_test, 4, 4, 1)) + 4 * yt[:, None, None, None]).astype(np.uint8)
  return datasets.Dataset(x, y, xt, yt, num_classes=classes, pixel_max=16.0,
                          class_names=tuple(map(str, range(classes))))


def tiny_pools(data, forget_class=0):
  forget = data.train_labels == forget_class
  return {"all": np.arange(len(forget)), "forget": np.flatnonzero(forget),
          "retain": np.flatnonzero(~forget)}


def tiny_trainer(data, mesh=None, chunk=4, batch_size=8):
  vit = model_lib.ViT(num_classes=data.num_classes, image_size=4, patch_size=2, hidden_size=8,
                      depth=1, num_heads=2, mlp_dim=16)
  variables = {"params": model_lib.init_params(vit, jax.random.key(0), 1)}
  t = train.Trainer(vit, data, tiny_pools(data), batch_size=batch_size, steps_per_chunk=chunk,
                    eval_batch_size=16, mesh=mesh, progress=False)
  return t, variables


def sgd(lr=0.1, **kw):
  return train.Optimizer(learning_rate=lr, **kw)


def ce_phase(pool, epochs, lr=0.1, **kw):
  return train.Phase("p", objectives.cross_entropy, {"data": train.Stream(pool, epochs=epochs)},
                     sgd(lr), **kw)


def one_device_mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])


def whole_stream(key, pool, *, batch_size, width, num_steps, chunk):
  """Every chunk_table of a stream, stacked: (num_chunks, chunk, width) indices and mask."""
  num_chunks = -(-num_steps // chunk)
  keys = train.stream_keys(key, pool.shape[0], batch_size=batch_size, num_steps=num_steps,
                           chunk=chunk)
  out = [train.chunk_table(keys, pool, c * chunk, num_steps, batch_size=batch_size, width=width,
                           chunk=chunk) for c in range(num_chunks)]
  return np.stack([np.asarray(i) for i, _ in out]), np.stack([np.asarray(m) for _, m in out])


def reference_stream(key, pool, *, batch_size, width, num_steps, chunk):
  """The same with numpy: whole epochs of jax.random.permutation, cut into batches."""
  n = pool.shape[0]
  per_epoch = -(-n // batch_size)
  epochs = -(-num_steps // per_epoch)
  idx, mask = [], []
  for k in jax.random.split(key, epochs):
    perm = np.asarray(jax.random.permutation(k, pool))
    for j in range(per_epoch):
      part = perm[j * batch_size:(j + 1) * batch_size]
      idx.append(np.pad(part, (0, width - len(part))))
      mask.append(np.pad(np.ones(len(part), np.float32), (0, width - len(part))))
  num_chunks = -(-num_steps // chunk)
  idx = np.zeros((num_chunks * chunk, width), np.int32) + np.pad(
      np.array(idx[:num_steps]), ((0, num_chunks * chunk - num_steps), (0, 0)))
  mask = np.pad(np.array(mask[:num_steps]), ((0, num_chunks * chunk - num_steps), (0, 0)))
  return idx.reshape(num_chunks, chunk, width), mask.reshape(num_chunks, chunk, width)


def test_epoch_keys_are_a_prefix_of_any_split():
  key = jax.random.key(3)
  data = lambda k: np.asarray(jax.random.key_data(k))
  np.testing.assert_array_equal(data(train.epoch_keys(key, 5))[:5], data(jax.random.split(key, 5)))
  np.testing.assert_array_equal(data(train.epoch_keys(key, 300))[:300],
                                data(jax.random.split(key, 300)))


@pytest.mark.parametrize("n, batch_size, width, num_steps, chunk", [
    (10, 4, 8, 7, 3),     # partial last batch, device padding, step padding
    (10, 4, 4, 30, 4),    # many epochs per chunk
    (133, 64, 64, 396, 50),  # digits' forget pool at the study's batch
    (1214, 64, 64, 37, 50),  # one partial chunk
])
def test_chunk_tables_match_a_numpy_reference(n, batch_size, width, num_steps, chunk):
  pool = jnp.arange(100, 100 + n, dtype=jnp.int32)
  kw = dict(batch_size=batch_size, width=width, num_steps=num_steps, chunk=chunk)
  got, want = whole_stream(jax.random.key(7), pool, **kw), reference_stream(jax.random.key(7), pool, **kw)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_chunk_table_epoch_semantics():
  pool = jnp.arange(100, 110, dtype=jnp.int32)  # 10 examples, batch 4 -> 4, 4, 2
  idx, mask = whole_stream(jax.random.key(0), pool, batch_size=4, width=8, num_steps=7, chunk=3)
  assert idx.shape == mask.shape == (3, 3, 8)
  idx, mask = idx.reshape(9, 8), mask.reshape(9, 8)
  np.testing.assert_array_equal(mask[:, 4:], 0)  # device padding
  np.testing.assert_array_equal(mask[7:], 0)  # steps padding up to whole chunks
  np.testing.assert_array_equal(mask[:7, :4].sum(1), [4, 4, 2, 4, 4, 2, 4])
  epochs = [idx[0:3, :4][mask[0:3, :4] > 0], idx[3:6, :4][mask[3:6, :4] > 0]]
  for e in epochs:  # every epoch is a permutation of the pool: nothing dropped or repeated
    np.testing.assert_array_equal(np.sort(e), np.arange(100, 110))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_steps_in_phase_keeps_partial_batches():
  data = tiny_data()
  t, _ = tiny_trainer(data)
  n_forget = int((data.train_labels == 0).sum())
  assert t.steps_in(ce_phase("forget", 3)) == 3 * -(-n_forget // 8)
  ph = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=2, max_steps=1)},
                   sgd())
  assert t.steps_in(ph) == 1


def test_step_compiles_once_across_epochs_partial_batches_and_phases():
  data = tiny_data()
  t, params = tiny_trainer(data)
  t.run(params, [ce_phase("all", 3)], jax.random.key(1), "a")  # 37 / 8: a partial last batch
  t.run(params, [ce_phase("retain", 2, lr=1e-3)], jax.random.key(2), "b")  # other pool, other lr
  t.run(params, [ce_phase("forget", 5, lr=1e-3)], jax.random.key(3), "c")
  assert t.num_traces == 1
  t.run(params, [ce_phase("forget", 2, lr=1e-3, sign=-1.0)], jax.random.key(4), "d")  # ascent
  # Another momentum, weight decay and a cosine schedule: traced values, the same step.
  cos = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=2)},
                    train.Optimizer(0.05, momentum=0.5, weight_decay=1e-3, final_learning_rate=1e-4))
  t.run(params, [cos], jax.random.key(5), "e")
  assert t.num_traces == 1
  kl = [train.Phase("k", objectives.kl_uniform, {"data": train.Stream("forget", epochs=2)}, sgd())]
  t.run(params, kl, jax.random.key(5), "e")
  t.run(params, kl, jax.random.key(6), "e")
  assert t.num_traces == 2


def _hp_objective(ctx, params, batch):
  b = batch["data"]
  logits, _ = ctx.apply(params, b["image"])
  return ctx.hp["scale"] * losses.cross_entropy(logits, b["label"], b["mask"]), {}


def test_hyperparameters_are_traced_not_compiled_in():
  data = tiny_data()
  t, params = tiny_trainer(data)
  outs = []
  for scale in (1.0, 0.5, 2.0):
    phase = train.Phase("h", _hp_objective, {"data": train.Stream("all", epochs=1)}, sgd(),
                        hparams={"scale": scale})
    outs.append(t.run(params, [phase], jax.random.key(1), "h")[1]["loss"])
  assert t.num_traces == 1
  np.testing.assert_allclose(np.array(outs[1][0]) * 2, outs[0][0], rtol=1e-6)  # first step: same batch
  np.testing.assert_allclose(np.array(outs[2][0]) / 2, outs[0][0], rtol=1e-6)


def _context_probe(ctx, params, batch):
  b = batch["data"]
  logits, _ = ctx.apply(params, b["image"])
  rows = jnp.sum(b["row"] * b["mask"])  # per-example table looked up by index
  want = jnp.sum((b["index"] * 10 + 1).astype(jnp.float32) * b["mask"])
  draw = jax.random.uniform(ctx.rng)
  return losses.cross_entropy(logits, b["label"], b["mask"]), dict(
      progress=ctx.progress, table_ok=(rows == want).astype(jnp.float32), draw=draw,
      teacher=jnp.sum(ctx.frozen["w"]))


def test_context_progress_rng_tables_and_frozen_inputs():
  data = tiny_data()
  t, params = tiny_trainer(data, chunk=3)
  table = (np.arange(len(data.train_labels)) * 10 + 1).astype(np.float32)
  inputs = train.Inputs(frozen={"w": np.ones(3, np.float32)}, tables={"row": table})
  phases = [train.Phase(n, _context_probe, {"data": train.Stream("all", epochs=1)}, sgd())
            for n in ("a", "b")]
  recipe = train.Recipe(phases, prepare=lambda trainer, p: inputs)
  t.run(params, recipe, jax.random.key(0), "x")  # (the log keeps losses; read aux via a stepper)
  probe = t.stepper(phases[0], params, inputs)
  m = jax.device_get(probe())
  np.testing.assert_array_equal(m["table_ok"], 1.0)
  np.testing.assert_array_equal(m["teacher"], 3.0)
  np.testing.assert_allclose(m["progress"], np.arange(3) / 3)
  assert len(set(np.asarray(m["draw"]).tolist())) == 3  # a fresh key every step


def test_sgd_matches_torch_with_weight_decay_and_momentum():
  import torch
  r = np.random.default_rng(0)
  p0, grads = r.normal(size=(5,)).astype(np.float32), r.normal(size=(4, 5)).astype(np.float32)
  t, _ = tiny_trainer(tiny_data())
  opt = train.Optimizer(0.1, momentum=0.9, weight_decay=0.01)
  state = t.new_state({"w": jnp.asarray(p0)}, opt)
  params = {"w": jnp.asarray(p0)}
  for g in grads:
    updates, state = optimizers.transform("sgd").update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  w = torch.tensor(p0, requires_grad=True)
  ref = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.01)
  for g in grads:
    w.grad = torch.tensor(g)
    ref.step()
  np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_cosine_schedule_spans_every_phase_of_its_optimizer():
  opt = train.Optimizer(3e-4, final_learning_rate=1e-6)
  sched = lambda t: opt.learning_rates([t], 100)[0]
  np.testing.assert_allclose(float(sched(0)), 3e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 1e-6, rtol=1e-4)
  # numpy reference of CosineAnnealingLR: eta_min + (eta_max - eta_min) (1 + cos(pi t / T)) / 2
  want = 1e-6 + (3e-4 - 1e-6) * (1 + np.cos(np.pi * 37 / 100)) / 2
  np.testing.assert_allclose(float(sched(37)), want, rtol=1e-5)


def _index_and_count(ctx, params, batch):
  b = batch["data"]
  return {"twice": b["index"] * 2}, jnp.sum(b["mask"])


def test_sweep_scatters_per_example_outputs_and_sums_totals():
  data = tiny_data()
  t, params = tiny_trainer(data)
  tables, count = t.sweep(_index_and_count, params, "forget")
  forget = np.flatnonzero(data.train_labels == 0)
  want = np.zeros(len(data.train_labels), np.int32)
  want[forget] = forget * 2
  np.testing.assert_array_equal(np.asarray(tables["twice"]), want)
  assert float(count) == len(forget)


def test_golden_loss_after_forty_steps():
  # Pinned: silent drift anywhere in the shared loop (batching, SGD, model) shows here.
  data = tiny_data()
  t, params = tiny_trainer(data)
  phase = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=8)},
                      train.Optimizer(0.2, momentum=0.9, weight_decay=1e-3))
  _, log = t.run(params, [phase], jax.random.key(1), "g")
  assert len(log["loss"]) == 40
  np.testing.assert_allclose(log["loss"][0], GOLDEN_FIRST, rtol=1e-5)
  np.testing.assert_allclose(log["loss"][-1], GOLDEN_LAST, rtol=1e-4)


# jax 0.10.2, 8 fake CPU devices (tests/conftest.py).
GOLDEN_FIRST, GOLDEN_LAST = 1.1230679750442505, 0.5575316548347473


def test_chunked_scan_matches_step_by_step():
  data = tiny_data()
  phases = [ce_phase("all", 2)]
  outs = []
  for chunk in (1, 5):
    t, params = tiny_trainer(data, chunk=chunk)
    p, log = t.run(params, phases, jax.random.key(1), "x")
    outs.append((p, np.array(log["loss"])))
  assert len(outs[0][1]) == len(outs[1][1]) == 10
  np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), outs[0][0], outs[1][0])


def test_one_device_and_eight_devices_agree():
  assert jax.device_count() == 8
  data = tiny_data()
  recipe = two_stage.recipe(_two_stage_config())
  outs = []
  for mesh in (one_device_mesh(), None):
    t, params = tiny_trainer(data, mesh=mesh)
    p, log = t.run(params, recipe, jax.random.key(1), "x")
    probs, feats = t.predict(p, "test")
    outs.append((np.array(log["loss"]), np.asarray(probs), p))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), outs[0][2], outs[1][2])


def test_batch_not_divisible_by_devices_is_padded():
  data = tiny_data()
  t, params = tiny_trainer(data, batch_size=5)
  assert t.width == 8
  t1, _ = tiny_trainer(data, batch_size=5, mesh=one_device_mesh())
  phases = [ce_phase("all", 1)]
  l8 = t.run(params, phases, jax.random.key(1), "x")[1]["loss"]
  l1 = t1.run(params, phases, jax.random.key(1), "x")[1]["loss"]
  np.testing.assert_allclose(l8, l1, rtol=1e-5)


def _two_stage_config():
  s = two_stage.get_config()
  s.epochs, s.learning_rate = 2, 0.05
  return s


def test_two_stage_objective_cuts_batches_to_common_size():
  r = np.random.default_rng(0)
  W = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
  apply_fn = lambda params, x, **kw: (x @ params, None)  # a linear "model" on feature vectors
  ctx = train.Context(apply=apply_fn, rng=jax.random.key(0), progress=jnp.float32(0),
                      hp={"temperature": 1.15}, inputs=train.Inputs(), num_classes=5)
  xf, xr = r.normal(size=(6, 3)).astype(np.float32), r.normal(size=(6, 3)).astype(np.float32)
  yr = r.integers(0, 5, 6)
  nf, nr = 3, 5  # real examples; m = 3
  batch = {"forget": dict(image=xf, label=np.zeros(6, np.int32), mask=(np.arange(6) < nf).astype(np.float32)),
           "retain": dict(image=xr, label=yr, mask=(np.arange(6) < nr).astype(np.float32))}
  loss, aux = two_stage.contrastive_retain(ctx, W, batch)
  zf, zr = xf[:3] @ np.asarray(W), xr[:3] @ np.asarray(W)
  S = zf.astype(np.float64) @ zr.T / 1.15
  S = S - S.max(1, keepdims=True)
  con = np.mean(-(S - np.log(np.exp(S).sum(1, keepdims=True))))
  lz = zr.astype(np.float64) - zr.max(1, keepdims=True)
  ret = np.mean(-(lz - np.log(np.exp(lz).sum(1, keepdims=True)))[np.arange(3), yr[:3]])
  np.testing.assert_allclose(aux["contrastive"], con, rtol=1e-5)
  np.testing.assert_allclose(aux["retain_ce"], ret, rtol=1e-5)
  np.testing.assert_allclose(loss, con + ret, rtol=1e-5)


def test_two_stage_retain_stream_cycles_without_reset():
  data = tiny_data()
  t, _ = tiny_trainer(data)
  n_retain = int((data.train_labels != 0).sum())
  idx, mask = whole_stream(jax.random.key(0), t.pools["retain"], batch_size=8, width=8,
                           num_steps=9, chunk=9)
  idx, mask = idx[0], mask[0]
  per_epoch = -(-n_retain // 8)
  assert per_epoch < 9  # the stream outlasts one pass and restarts, reshuffled
  first = idx[:per_epoch][mask[:per_epoch] > 0]
  np.testing.assert_array_equal(np.sort(first), np.flatnonzero(data.train_labels != 0))


def test_nan_loss_raises():
  data = tiny_data()
  t, params = tiny_trainer(data)
  bad = jax.tree.map(lambda x: x * np.nan, params)
  with pytest.raises(FloatingPointError, match="learning rate"):
    t.run(bad, [ce_phase("all", 1)], jax.random.key(0), "x")


class _Stop(Exception):
  pass


class _SnapshotThenStop:
  """Snapshots at every chunk boundary (as `checkpoints.Snapshots`, in memory); stops after `n`."""

  def __init__(self, n: int):
    self.n, self.saved = n, []

  def due(self):
    return True

  def save(self, position, arrays, log):
    self.saved.append(dict(position, arrays=jax.device_get(arrays), loss=list(log["loss"])))
    if len(self.saved) == self.n:
      raise _Stop


def _two_optimizer_recipe():
  """SGD with a cosine schedule over all 10 steps, then Adam over 12 retain steps."""
  return train.Recipe([
      train.Phase("sgd", objectives.cross_entropy, {"data": train.Stream("all", epochs=2)},
                  sgd(0.1, final_learning_rate=0.01)),
      train.Phase("adam", objectives.cross_entropy, {"data": train.Stream("retain", epochs=3)},
                  train.Optimizer(learning_rate=0.01, name="adam", kind="adam"))])


@pytest.mark.parametrize("chunk, resume_chunk, stop_after, position", [
    (4, 3, 2, (0, 8)),  # the first phase's last chunk of 3 has 2 live steps
    (4, 7, 4, (1, 4)),  # in the second phase: one 7-step chunk, 8 live steps in 2 chunks
    (3, 1, 3, (0, 9)),
    (2, 5, 5, (1, 0)),  # at the phase boundary
])
def test_resume_with_another_chunk_size_equals_the_uninterrupted_run(chunk, resume_chunk,
                                                                    stop_after, position):
  data = tiny_data()
  recipe = _two_optimizer_recipe()
  t, params = tiny_trainer(data, chunk=chunk)
  want, want_log = t.run(params, recipe, jax.random.key(1), "x")
  snapshots = _SnapshotThenStop(stop_after)
  with pytest.raises(_Stop):
    t.run(params, recipe, jax.random.key(1), "x", snapshots=snapshots)
  snap = snapshots.saved[-1]
  assert set(snap) == {"phase", "step", "arrays", "loss"}
  assert (snap["phase"], snap["step"]) == position
  before = sum(t.steps_in(p) for p in recipe.phases[:snap["phase"]])
  assert len(snap["loss"]) == before + snap["step"]
  t2, _ = tiny_trainer(data, chunk=resume_chunk)
  got, got_log = t2.run(params, recipe, jax.random.key(1), "x",
                        resume=dict(snap, arrays=t2.place(snap["arrays"])))
  assert len(got_log["loss"]) == len(want_log["loss"])
  np.testing.assert_array_equal(got_log["loss"], want_log["loss"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
