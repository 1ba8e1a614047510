"""scripts/benchmark.py --quick end to end: every method's steps timed, PyTorch compared.

The script runs in a subprocess: --quick lowers XLA's optimisation level, which XLA
reads once, when JAX starts (the script sets it before importing jax), and other
tests may have started JAX in this process already. It gets 2 fake CPU devices, not
the tests' 8: still the data-parallel path, and faster, since compiling its ~20 step
and sweep functions takes most of the run and grows with the device count (~40-55 s
on the 2-core CPU, against ~50-65 s with 8).
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax

from jaxunlearn.methods import METHODS

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"

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
    "delete/prepare", "delete/decoupled_kl",
    "fcs/kl_uniform", "fcs/contrastive", "fcs/cross_entropy",
    "eval",
]


def _positive(x) -> bool:
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_run_times_every_method(tmp_path):
  out_path = tmp_path / "bench.json"
  cmd = [sys.executable, str(_SCRIPT), "--quick", "--gemms", "--out", str(out_path)]
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  out = json.loads(out_path.read_text())

  assert out["machine"]["jax_devices"] and out["machine"]["cpu_count"] >= 1
  assert out["machine"]["torch_version"] and out["machine"]["jax_version"] == jax.__version__
  assert "--xla_backend_optimization_level=0" in out["machine"]["xla_flags"]
  for dtype in ("float32", "bfloat16"):
    assert _positive(out["matmul_peak"][dtype]["gflops_per_s"])

  (res,) = out["results"]
  assert (res["model"], res["batch_size"], res["dtype"]) == ("digits", 8, "float32")
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

  # Steps that share an objective and streams share one compile (hyperparameters, the
  # sign and the pool are traced); different method inputs (SalUn's mask) do not.
  compiled_by = {name: r["compiled_by"] for name, r in rows.items() if "compiled_by" in r}
  assert {n: c for n, c in compiled_by.items() if n != c} == {
      "finetune/cross_entropy": "ce_train",
      "gradient_ascent/cross_entropy": "ce_train",
      "random_labels/cross_entropy": "ce_train",
      "fcs/kl_uniform": "two_stage/kl_uniform",
      "fcs/cross_entropy": "ce_train",
  }

  torch_res = res["torch"]
  assert _positive(torch_res["eager"][torch_res["best_attn"]]["examples_per_s"])
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
