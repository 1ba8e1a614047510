"""The shared training loop: epoch semantics, compile-once, chunking, data parallelism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import datasets, losses, model as model_lib, objectives, train
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


def tiny_trainer(data, mesh=None, chunk=4, batch_size=8):
  vit = model_lib.ViT(num_classes=data.num_classes, image_size=4, patch_size=2, hidden_size=8,
                      depth=1, num_heads=2, mlp_dim=16)
  params = model_lib.init_params(vit, jax.random.key(0), 1)
  t = train.Trainer(vit, data, forget_class=0, batch_size=batch_size, momentum=0.9,
                    steps_per_chunk=chunk, eval_batch_size=16, mesh=mesh, progress=False)
  return t, params


def one_device_mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])


def whole_stream(key, pool, *, batch_size, width, num_steps, chunk):
  """Every chunk_table of a stream, stacked: (num_chunks, chunk, width) indices and mask."""
  num_chunks = -(-num_steps // chunk)
  keys = train.stream_keys(key, pool.shape[0], batch_size=batch_size, num_chunks=num_chunks,
                           chunk=chunk)
  out = [train.chunk_table(keys, pool, c, num_steps, batch_size=batch_size, width=width,
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
  ph = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("forget", epochs=3)})
  assert t.steps_in(ph) == 3 * -(-n_forget // 8)
  ph = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=2, max_steps=1)})
  assert t.steps_in(ph) == 1


def test_step_compiles_once_across_epochs_partial_batches_and_phases():
  data = tiny_data()
  t, params = tiny_trainer(data)
  ce = lambda pool, e: [train.Phase("p", objectives.cross_entropy, {"data": train.Stream(pool, epochs=e)})]
  t.run(params, ce("all", 3), jax.random.key(1), "a", 0.1)  # 37 / 8: a partial last batch
  t.run(params, ce("retain", 2), jax.random.key(2), "b", 1e-3)  # other pool, other lr
  t.run(params, ce("forget", 5), jax.random.key(3), "c", 1e-3)
  assert t.num_traces == 1
  ga = [train.Phase("g", objectives.cross_entropy, {"data": train.Stream("forget", epochs=2)},
                    sign=-1.0)]
  t.run(params, ga, jax.random.key(4), "d", 1e-3)  # gradient ascent: the same step
  assert t.num_traces == 1
  kl = [train.Phase("k", objectives.kl_uniform, {"data": train.Stream("forget", epochs=2)})]
  t.run(params, kl, jax.random.key(5), "e", 1e-3)
  t.run(params, kl, jax.random.key(6), "e", 1e-3)
  assert t.num_traces == 2


def test_sign_minus_one_ascends():
  # Sign -1 on CE must equal minimising losses.negated_cross_entropy, bit for bit.
  def negated_ce(apply_fn, params, batch):
    b = batch["data"]
    return losses.negated_cross_entropy(apply_fn(params, b["image"])[0], b["label"], b["mask"]), {}

  data = tiny_data()
  stream = {"data": train.Stream("forget", epochs=3)}
  out = []
  for phase in (train.Phase("g", objectives.cross_entropy, stream, sign=-1.0),
                train.Phase("g", negated_ce, stream)):
    t, params = tiny_trainer(data)
    out.append(t.run(params, [phase], jax.random.key(4), "g", 0.1))
  (pa, log_a), (pb, log_b) = out
  assert log_a["loss"] == log_b["loss"] and log_a["loss"][0] < 0
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_chunked_scan_matches_step_by_step():
  data = tiny_data()
  phases = [train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=2)})]
  outs = []
  for chunk in (1, 5):
    t, params = tiny_trainer(data, chunk=chunk)
    p, log = t.run(params, phases, jax.random.key(1), "x", 0.1)
    outs.append((p, np.array(log["loss"])))
  assert len(outs[0][1]) == len(outs[1][1]) == 10
  np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), outs[0][0], outs[1][0])


def test_one_device_and_eight_devices_agree():
  assert jax.device_count() == 8
  data = tiny_data()
  phases = two_stage.phases(_two_stage_config())
  outs = []
  for mesh in (one_device_mesh(), None):
    t, params = tiny_trainer(data, mesh=mesh)
    p, log = t.run(params, phases, jax.random.key(1), "x", 0.05)
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
  phases = [train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=1)})]
  l8 = t.run(params, phases, jax.random.key(1), "x", 0.1)[1]["loss"]
  l1 = t1.run(params, phases, jax.random.key(1), "x", 0.1)[1]["loss"]
  np.testing.assert_allclose(l8, l1, rtol=1e-5)


def _two_stage_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(unlearn_epochs=2, two_stage=dict(temperature=1.15, stage1_steps=1)))


def test_two_stage_objective_cuts_batches_to_common_size():
  r = np.random.default_rng(0)
  W = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
  apply_fn = lambda params, x: (x @ params, None)  # a linear "model" on feature vectors
  xf, xr = r.normal(size=(6, 3)).astype(np.float32), r.normal(size=(6, 3)).astype(np.float32)
  yr = r.integers(0, 5, 6)
  nf, nr = 3, 5  # real examples; m = 3
  batch = {"forget": dict(image=xf, label=np.zeros(6, np.int32), mask=(np.arange(6) < nf).astype(np.float32)),
           "retain": dict(image=xr, label=yr, mask=(np.arange(6) < nr).astype(np.float32))}
  loss, aux = two_stage.contrastive_retain(apply_fn, W, batch, temperature=1.15)
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
  phases = [train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=1)})]
  bad = jax.tree.map(lambda x: x * np.nan, params)
  with pytest.raises(FloatingPointError, match="learning_rate"):
    t.run(bad, phases, jax.random.key(0), "x", 0.1)
