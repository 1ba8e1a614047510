"""Accelerator checks: run by scripts/gpu_check.sh on a machine with a GPU.

Skipped where there is none (CI). The GPU run must match the CPU run of the same
steps: same code path, different backend; for the ViT (stateless) and for the
ResNet, whose BatchNorm statistics are reductions over the batch that the GPU
computes in another order.
"""
import jax
import numpy as np
import pytest

from jaxunlearn import models, objectives, train
from jaxunlearn.models import resnet
from tests.test_train import tiny_data, tiny_pools, tiny_trainer

GPUS = [d for d in jax.devices() if d.platform == "gpu"]
pytestmark = pytest.mark.skipif(not GPUS, reason="needs a GPU: run scripts/gpu_check.sh on one")


def _mesh(devices):
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def _vit_trainer(data, mesh):
  return tiny_trainer(data, mesh=mesh)


def _resnet_trainer(data, mesh):
  # Two stages on the 4x4 images: a stride-2 block and its projection shortcut too.
  model = models.Model(resnet.ResNet(num_classes=data.num_classes, stage_sizes=(1, 1), width=4),
                       stateful=True)
  variables = model.init(jax.random.key(0), (1, *data.train_images.shape[1:]))
  t = train.Trainer(model, data, tiny_pools(data), batch_size=8, steps_per_chunk=4,
                    eval_batch_size=16, mesh=mesh, progress=False)
  return t, variables


@pytest.mark.parametrize("make_trainer", [_vit_trainer, _resnet_trainer], ids=["vit", "resnet"])
def test_gpu_training_matches_cpu(make_trainer):
  data = tiny_data()
  phases = [train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=3)},
                        train.Optimizer(0.1))]
  out = []
  with jax.default_matmul_precision("highest"):  # no TF32: compare like with like
    for devices in (jax.devices("cpu")[:1], GPUS):
      with jax.default_device(devices[0]):
        t, variables = make_trainer(data, _mesh(devices))
        trained, log = t.run(variables, phases, jax.random.key(1), "x")
        probs, _ = t.predict(trained, "test")
        out.append((np.array(log["loss"]), np.asarray(probs), jax.device_get(trained)))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-4)
  # The ResNet's running statistics (the ViT has none) went through the same updates.
  cpu_state, gpu_state = (models.model_state(o[2]) for o in out)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               cpu_state, gpu_state)
