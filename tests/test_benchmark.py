"""scripts/benchmark.py and its modules: every method's steps timed, PyTorch compared, the
PyTorch ResNet and the FLOP counts checked against independent references.

The script runs in a subprocess: --quick lowers XLA's optimisation level (ViT only),
which XLA reads once, when JAX starts (the script sets it before importing jax), and
other tests may have started JAX in this process already. It gets 2 fake CPU
devices, not the tests' 8: still the data-parallel path, and faster, since compiling
its ~20 step and sweep functions takes most of the run and grows with the device
count (on the 2-core CPU the ViT run takes ~30-60 s, the ResNet run ~15 s).
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from jaxunlearn import models, objectives, train
from jaxunlearn.methods import METHODS
from tests.test_train import tiny_data, tiny_trainer

_SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(_SCRIPTS))
import bench_jax  # noqa: E402
import bench_models  # noqa: E402
import bench_torch  # noqa: E402

# Rows of --quick in order: the CE step, each method's prepare sweep and distinct steps
# (SSD has none: its whole run), evaluation.
ROWS = [
    "ce_train",
    "finetune/cross_entropy",
    "gradient_ascent/cross_entropy",
    "two_stage/kl_uniform", "two_stage/contrastive_retain",
    "random_labels/random_label_ce", "random_labels/cross_entropy",
    "salun/prepare", "salun/random_label_ce", "salun/cross_entropy",
    "l1_sparse/ce_l1",
    "neggrad_plus/retain_minus_forget",
    "scrub/prepare", "scrub/max_step", "scrub/min_step",
    "boundary_shrinking/prepare", "boundary_shrinking/shrink",
    "ssd/prepare", "ssd/run",
    "ssd_det/prepare", "ssd_det/run",
    "delete/prepare", "delete/decoupled_kl",
    "fcs/kl_uniform", "fcs/contrastive", "fcs/cross_entropy",
    "eval",
]


def _positive(x) -> bool:
  return isinstance(x, float) and math.isfinite(x) and x > 0


def _run_script(tmp_path, *args) -> dict:
  out_path = tmp_path / "bench.json"
  cmd = [sys.executable, str(_SCRIPTS / "benchmark.py"), *args, "--out", str(out_path)]
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return json.loads(out_path.read_text())


def test_quick_run_times_every_method(tmp_path):
  out = _run_script(tmp_path, "--quick", "--gemms")

  assert out["machine"]["jax_devices"] and out["machine"]["cpu_count"] >= 1
  assert out["machine"]["torch_version"] and out["machine"]["jax_version"] == jax.__version__
  assert "--xla_backend_optimization_level=0" in out["machine"]["xla_flags"]
  for dtype in ("float32", "bfloat16"):
    assert _positive(out["matmul_peak"][dtype]["gflops_per_s"])

  (res,) = out["results"]
  assert (res["model"], res["arch"], res["batch_size"], res["dtype"]) == (
      "digits", "vit", 8, "float32")
  assert res["vit"]["depth"] == 1  # --quick's one-block model
  assert res["num_devices"] == 2  # the data-parallel path
  rows = res["jax"]
  assert list(rows) == ROWS
  assert {r.split("/")[0] for r in ROWS} == {"ce_train", "eval", *METHODS}

  for name, r in rows.items():
    assert _positive(r["ms_per_call" if r["kind"] == "call" else "ms_per_step"]), name
    assert math.isfinite(r["compile_s"]) and r["compile_s"] >= 0, name
    if r["kind"] == "step":
      for key in ("examples_per_s", "gflops_per_s", "fraction_of_peak"):
        assert _positive(r[key]), (name, key)
      # Each row compiled its own step unless an earlier one had the same step function.
      if r.get("compiled_by", name) == name:
        assert r["compile_s"] > 0, name
  # --quick: 2 steps per call, batch 8; a step over two streams puts twice the images
  # through the model.
  two_streams = {"two_stage/contrastive_retain", "neggrad_plus/retain_minus_forget",
                 "fcs/contrastive"}
  for name, r in rows.items():
    if r["kind"] == "step" and name != "eval":
      assert r["steps_per_call"] == 2, name
      assert r["examples_per_step"] == (16 if name in two_streams else 8), name
  assert rows["two_stage/contrastive_retain"]["streams"] == {"forget": "forget", "retain": "retain"}
  # Evaluation: the 16 test images in 2 batches of 8, one call.
  assert (rows["eval"]["steps_per_call"], rows["eval"]["examples_per_step"]) == (2, 8)

  # Steps that share an objective, streams and optimizer kind share one compile
  # (hyperparameters, the sign and the pool are traced); different method inputs
  # (SalUn's mask) do not.
  compiled_by = {name: r["compiled_by"] for name, r in rows.items() if "compiled_by" in r}
  assert {n: c for n, c in compiled_by.items() if n != c} == {
      "finetune/cross_entropy": "ce_train",
      "gradient_ascent/cross_entropy": "ce_train",
      "random_labels/cross_entropy": "ce_train",
      "fcs/kl_uniform": "two_stage/kl_uniform",
      "fcs/cross_entropy": "ce_train",
  }

  torch_res = res["torch"]
  assert _positive(torch_res["eager"][torch_res["best_variant"]]["examples_per_s"])
  assert torch_res["compile"]["status"] == "skipped"
  assert _positive(res["jax_over_torch_eager"])
  assert "| digits | 8 | float32 | ce_train |" in out["table"]
  assert "| digits | 8 | float32 | ssd/run |" in out["table"]
  assert "(as ce_train)" in out["table"]

  # --gemms: every dense layer's forward, input- and weight-gradient matmul, both libraries.
  assert [(g["layer"], g["op"]) for g in res["gemms"]] == [
      (layer, op) for layer in ("qkv", "proj", "fc1", "fc2")
      for op in ("forward", "input_grad", "weight_grad")]
  tokens = 8 * ((8 // 2) ** 2 + 1)  # batch x tokens of the digits ViT (patch 2, width 64)
  assert res["gemms"][0]["rows"] == tokens and res["gemms"][0]["outputs"] == 3 * 64
  for g in res["gemms"]:
    assert _positive(g["jax_ms"]) and _positive(g["torch_ms"]) and _positive(g["jax_over_torch"])
  assert f"| digits | 8 | qkv | weight_grad | 64 x {tokens} x 192 |" in out["gemm_table"]


def test_quick_resnet_run_against_pytorch(tmp_path):
  out = _run_script(tmp_path, "--quick", "--model", "resnet18", "--methods", "finetune")
  # XLA's level 0 would make the ResNet's steps ~25x slower: --quick keeps the default.
  assert "--xla_backend_optimization_level=0" not in out["machine"]["xla_flags"]
  (res,) = out["results"]
  assert (res["model"], res["arch"], res["input"]) == (
      "resnet18", "resnet", "uint8 32x32x3, at model size")
  assert res["resnet"] == {"stage_sizes": [1, 1, 1, 1], "block": "basic", "width": 8}
  # The JAX ResNet's parameters, counted here from the PyTorch one: the same model.
  torch_net = bench_torch.resnet(bench_models.spec("resnet18", resnet_width=8,
                                                   resnet_stages="1,1,1,1"))
  assert res["num_params"] == sum(p.numel() for p in torch_net.parameters())
  assert list(res["jax"]) == ["ce_train", "finetune/cross_entropy", "eval"]
  ce = res["jax"]["ce_train"]
  assert ce["model_flops_per_step"] == 3 * 8 * res["forward_flops_per_example"]
  assert _positive(ce["examples_per_s"]) and ce["interleaved_with"] == ["nchw"]
  assert res["jax"]["finetune/cross_entropy"]["compiled_by"] == "ce_train"
  eager = res["torch"]["eager"]["nchw"]
  assert (eager["status"], eager["num_threads"]) == ("ok", 1)
  assert res["jax_over_torch_eager"] == pytest.approx(
      ce["examples_per_s"] / eager["examples_per_s"])
  assert "| resnet18 | 8 | float32 | ce_train |" in out["table"]


@pytest.mark.parametrize("name,sizes", [
    ("resnet18", dict(resnet_width=8, resnet_stages="1,2,1,1")),  # identity + projection
    ("resnet50", dict(resnet_width=4, resnet_stages="1,1,1,1")),  # bottleneck, stride on 3x3
])
def test_resnet_flops_match_torch_counter(name, sizes):
  spec = bench_models.spec(name, **sizes)
  net = bench_torch.resnet(spec).eval()
  with FlopCounterMode(display=False) as counter:
    net(torch.zeros(1, 3, 32, 32))
  assert bench_models.forward_flops(spec) == counter.get_total_flops()


def test_vit_flops_match_torch_counter():
  spec = bench_models.spec("digits")
  net = bench_torch._vit(spec, "eager").eval()  # eager attention: matmuls the counter sees
  with FlopCounterMode(display=False) as counter:
    net(pixel_values=torch.zeros(1, 1, 8, 8))
  assert bench_models.forward_flops(spec) == counter.get_total_flops()


def test_torch_resnet_is_the_tested_reference():
  """bench_torch's ResNet has the names, shapes and outputs of tests/test_resnet.py's
  reference, which that file checks against the JAX ResNet weight by weight."""
  from tests.test_resnet import _torch_resnet
  for block, name in (("basic", "resnet18"), ("bottleneck", "resnet50")):
    spec = bench_models.spec(name, resnet_width=4, resnet_stages="2,1,1,1")
    torch.manual_seed(0)
    ours, ref = bench_torch.resnet(spec), _torch_resnet((2, 1, 1, 1), block, 4, num_classes=10)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(ours(x), ref(x)[0])  # train mode: batch statistics
    # And the JAX model of the same name and sizes has as many parameters.
    shapes = jax.eval_shape(lambda: bench_models.build(name, jax.random.key(0), resnet_width=4,
                                                       resnet_stages="2,1,1,1")[1])
    assert models.num_params(shapes["params"]) == sum(p.numel() for p in ours.parameters())


def test_chunk_key_equal_exactly_when_the_trainer_reuses_a_compile():
  """The benchmark's `compiled_by` prediction against the Trainer's own trace count."""
  t, variables = tiny_trainer(tiny_data())
  ce = lambda pool, **kw: train.Phase("p", objectives.cross_entropy,
                                      {"data": train.Stream(pool, **kw)}, train.Optimizer(0.1))
  mask = train.Inputs(update_mask=jax.tree.map(jnp.ones_like, variables["params"]))
  adam = train.Phase("p", objectives.cross_entropy, {"data": train.Stream("all", epochs=1)},
                     train.Optimizer(1e-3, kind="adam"))
  cases = [  # (phase, inputs, compiles anew)
      (ce("all", epochs=1), train.Inputs(), True),
      (ce("forget", epochs=2), train.Inputs(), False),  # pool, length: traced
      (train.Phase("q", objectives.cross_entropy, {"data": train.Stream("retain", epochs=1)},
                   train.Optimizer(0.5, momentum=0.0), sign=-1.0), train.Inputs(), False),
      (train.Phase("p", objectives.kl_uniform, {"data": train.Stream("all", epochs=1)},
                   train.Optimizer(0.1)), train.Inputs(), True),  # another objective
      (ce("all", epochs=1), mask, True),  # other method inputs
      # A batch is padded to a multiple of the device count (the tests' 8: batch 4 runs
      # at the run's width 8), and batch 16 is another width.
      (ce("all", epochs=1, batch_size=4), train.Inputs(), t.data.width(4) != t.width),
      (ce("all", epochs=1, batch_size=16), train.Inputs(), True),
      (adam, train.Inputs(), True),  # another optimizer kind
  ]
  seen = set()
  for i, (phase, inputs, new) in enumerate(cases):
    key = bench_jax.chunk_key(t, phase, inputs)
    assert (key not in seen) == new, i
    seen.add(key)
    traces = t.num_traces
    t.stepper(phase, variables, inputs)
    assert (t.num_traces > traces) == new, i


def test_tuning_benchmark_times_trials_and_pytorch(tmp_path):
  """scripts/bench_tune.py: trials per minute, where a trial's time goes, PyTorch's loop."""
  import bench_tune
  out = bench_tune.main(["--trials", "2", "--train_epochs", "1", "--torch", "--torch_threads", "1",
                         "--out", str(tmp_path / "tune.json")])
  j = out["jax"]
  assert j["trials"] == 2 and _positive(j["trials_per_minute"])
  assert 0 <= j["overhead"] < 1
  assert j["run_seconds"] + j["eval_seconds"] + j["compile_seconds"] <= j["seconds"] + 1e-6
  assert out["torch_eager"]["trials"] == 2 and _positive(out["speedup"])
  assert json.loads((tmp_path / "tune.json").read_text()) == json.loads(json.dumps(out))
