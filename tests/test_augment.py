"""Crop-and-flip augmentation against numpy, and inside the loop: deterministic, training only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import augment, objectives, train
from jaxunlearn.models import vit as model_lib
from tests.test_train import tiny_data, tiny_pools


def np_crop_flip(images, offsets, flips, pad):
  """torchvision's RandomCrop(padding=pad) + RandomHorizontalFlip, given the draws."""
  B, H, W, C = images.shape
  out = np.empty_like(images)
  padded = np.zeros((B, H + 2 * pad, W + 2 * pad, C), images.dtype)
  padded[:, pad:pad + H, pad:pad + W] = images
  for i, ((dy, dx), f) in enumerate(zip(offsets, flips)):
    window = padded[i, dy:dy + H, dx:dx + W]
    out[i] = window[:, ::-1] if f else window
  return out


def test_crop_flip_matches_numpy_given_the_same_offsets_and_flips():
  r = np.random.default_rng(0)
  images = r.uniform(size=(6, 8, 8, 3)).astype(np.float32)
  offsets = r.integers(0, 9, (6, 2)).astype(np.int32)
  offsets[0], offsets[1] = (0, 0), (8, 8)  # the corners: all padding on two sides
  flips = np.array([0, 1, 0, 1, 1, 0], bool)
  got = jax.jit(augment.crop_flip)(images, offsets, flips)
  np.testing.assert_array_equal(np.asarray(got), np_crop_flip(images, offsets, flips, 4))


def test_random_draws_cover_every_offset_and_both_flips():
  images = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1), (4000, 4, 4, 1))
  k_offset, k_flip = jax.random.split(jax.random.key(3))
  offsets = np.asarray(jax.random.randint(k_offset, (4000, 2), 0, 9))
  flips = np.asarray(jax.random.bernoulli(k_flip, 0.5, (4000,)))
  got = augment.random_crop_flip(jax.random.key(3), images)
  np.testing.assert_array_equal(np.asarray(got), np_crop_flip(np.asarray(images), offsets, flips, 4))
  assert set(np.unique(offsets)) == set(range(9)) and 0.45 < flips.mean() < 0.55
  assert augment.apply("none", jax.random.key(0), images) is images


def _pixels(ctx, params, batch):
  b = batch["data"]
  pixels = jnp.sum(b["image"] * b["mask"][:, None, None, None])
  return objectives.cross_entropy(ctx, params, batch)[0], {"pixels": pixels}


def _trainer(kind):
  data = tiny_data()
  vit = model_lib.ViT(num_classes=data.num_classes, image_size=4, patch_size=2, hidden_size=8,
                      depth=1, num_heads=2, mlp_dim=16)
  variables = {"params": model_lib.init_params(vit, jax.random.key(0), 1)}
  t = train.Trainer(vit, data, tiny_pools(data), batch_size=8, steps_per_chunk=4,
                    eval_batch_size=16, progress=False, augment=kind)
  return t, variables


@pytest.mark.parametrize("augmented_stream", [True, False])
def test_the_loop_augments_training_streams_deterministically(augmented_stream):
  t_none, variables = _trainer("none")
  t_aug, _ = _trainer("crop_flip")
  stream = train.Stream("all", epochs=1, augment=augmented_stream)
  phase = train.Phase("p", _pixels, {"data": stream}, train.Optimizer(0.1))
  sums = [np.asarray(jax.device_get(t.stepper(phase, variables)())["pixels"])
          for t in (t_none, t_aug, t_aug)]
  np.testing.assert_array_equal(sums[1], sums[2])  # the same steps draw the same crops
  # Crops shift pixels onto the zero padding: the augmented batches lose brightness.
  assert np.all(sums[1] < sums[0]) if augmented_stream else np.array_equal(sums[1], sums[0])
  # Evaluation never augments.
  np.testing.assert_array_equal(np.asarray(t_aug.predict(variables, "test")[0]),
                                np.asarray(t_none.predict(variables, "test")[0]))
  # Nor do sweeps (SalUn's mask, SSD's importances, teacher tables).
  def sweep(ctx, params, batch):
    per_example = jnp.sum(batch["data"]["image"], axis=(1, 2, 3)) * batch["data"]["mask"]
    return per_example, jnp.sum(per_example)
  got = [jax.device_get(t.sweep(sweep, variables, "all")) for t in (t_none, t_aug)]
  np.testing.assert_array_equal(got[0][0], got[1][0])
  np.testing.assert_array_equal(got[0][1], got[1][1])
  assert float(got[0][1]) > 0


def test_an_augmented_run_resumes_bitwise_from_a_snapshot():
  """Crops and flips come from the step's key: a resumed run draws the same ones."""
  from tests.test_resnet_training import _Memory
  t, variables = _trainer("crop_flip")
  phase = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=3)},
                      train.Optimizer(0.1, momentum=0.9))
  whole, log = t.run(variables, [phase], jax.random.key(5), "x")
  memory = _Memory()
  t.run(variables, [phase], jax.random.key(5), "x", snapshots=memory)
  snap = memory.saved
  assert snap is not None
  template = t.snapshot_template(variables, {phase.optimizer.name: phase.optimizer})
  arrays = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), snap["arrays"], template)
  resumed, log2 = t.run(variables, [phase], jax.random.key(5), "x", resume=dict(snap, arrays=arrays))
  assert log2["loss"] == log["loss"]
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)
  # Without augmentation the same run differs: the draws did something.
  t_none, _ = _trainer("none")
  _, plain = t_none.run(variables, [phase], jax.random.key(5), "x")
  assert plain["loss"] != log["loss"]


# Which stages train on augmented batches, as each reference's loaders do (and each
# method's docstring says): Unlearn-Sparse's training loader for Original, Gold and
# every method built on it; SCRUB's notebook loaders are unaugmented; SSD and SSD-Det
# only sweep (sweeps never augment).
AUGMENTED = {"original": True, "retrain": True, "finetune": True, "gradient_ascent": True,
             "two_stage": True, "random_labels": True, "salun": True, "l1_sparse": True,
             "neggrad_plus": True, "boundary_shrinking": True, "delete": True, "fcs": True,
             "scrub": False, "ssd": None, "ssd_det": None}


def test_each_method_augments_as_its_reference():
  from jaxunlearn import config as config_lib, methods, pipeline
  assert sorted(AUGMENTED) == sorted([*methods.TRAINING, *methods.METHODS])
  c = config_lib.get_base_config()
  for name, expected in AUGMENTED.items():
    flags = {s.augment for p in pipeline.stage_recipe(c, name).phases for s in p.streams.values()}
    assert flags == (set() if expected is None else {expected}), name
