"""Accelerator checks: run by scripts/gpu_check.sh on a machine with a GPU.

Skipped where there is none (CI). The GPU run must match the CPU run of the same
steps: same code path, different backend.
"""
import jax
import numpy as np
import pytest

from jaxunlearn import objectives, train
from tests.test_train import tiny_data, tiny_trainer

GPUS = [d for d in jax.devices() if d.platform == "gpu"]
pytestmark = pytest.mark.skipif(not GPUS, reason="needs a GPU: run scripts/gpu_check.sh on one")


def _mesh(devices):
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def test_gpu_training_matches_cpu():
  data = tiny_data()
  phases = [train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=3)},
                        train.Optimizer(0.1))]
  out = []
  with jax.default_matmul_precision("highest"):  # no TF32: compare like with like
    for devices in (jax.devices("cpu")[:1], GPUS):
      with jax.default_device(devices[0]):
        t, params = tiny_trainer(data, mesh=_mesh(devices))
        p, log = t.run(params, phases, jax.random.key(1), "x")
        probs, _ = t.predict(p, "test")
        out.append((np.array(log["loss"]), np.asarray(probs)))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-4)
