"""scripts/benchmark.py --quick end to end: every step timed, FLOPs counted, PyTorch compared."""
import importlib.util
import json
import pathlib

import jax

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def _load_benchmark():
  spec = importlib.util.spec_from_file_location("benchmark", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quick_run_writes_positive_numbers(tmp_path):
  benchmark = _load_benchmark()
  out_path = tmp_path / "bench.json"
  benchmark.main(["--quick", "--gemms", "--out", str(out_path)])
  out = json.loads(out_path.read_text())

  assert out["machine"]["jax_devices"] and out["machine"]["cpu_count"] >= 1
  assert out["machine"]["torch_version"] and out["machine"]["jax_version"] == jax.__version__
  for dtype in ("float32", "bfloat16"):
    assert out["matmul_peak"][dtype]["gflops_per_s"] > 0
  # XLA counts a scan's body once (see the script); the run checks it and records it.
  assert isinstance(out["cost_analysis"]["loop_body_counted_once"], bool)

  (res,) = out["results"]
  assert (res["model"], res["batch_size"], res["dtype"]) == ("digits", 8, "float32")
  assert res["num_devices"] == jax.device_count()  # 8 fake CPU devices under tests
  assert set(res["jax"]) == set(benchmark.STEP_NAMES)
  for step, r in res["jax"].items():
    for key in ("examples_per_s", "ms_per_step", "flops_per_step", "gflops_per_s",
                "fraction_of_peak", "compile_s", "first_call_s"):
      assert r[key] > 0, (step, key)
    # Per-device count x devices vs the global program: equal but for the work every
    # device repeats (the SGD update, ~10% here with one example per device).
    assert abs(r["flops_per_step"] / r["flops_per_step_lowered"] - 1) < 0.15, step
    # XLA's count (matmuls + elementwise) is at least the matmul FLOPs counted by hand:
    # a scan's body is counted once, not divided among its steps.
    assert 1.0 < r["xla_over_model_flops"] < 2.0, step
  ce = res["jax"]["ce_train"]
  # One forward-backward over forget + retain batches: twice the images of a CE step.
  assert res["jax"]["contrastive_retain"]["examples_per_step"] == 2 * ce["examples_per_step"]
  assert 1.8 < res["jax"]["contrastive_retain"]["flops_per_step"] / ce["flops_per_step"] < 2.2
  # Evaluation is a forward pass only: about a third of a train step.
  assert 0.2 < res["jax"]["eval"]["flops_per_step"] / ce["flops_per_step"] < 0.5

  torch_res = res["torch"]
  assert torch_res["eager"][torch_res["best_attn"]]["examples_per_s"] > 0
  assert torch_res["compile"]["status"] == "skipped"
  assert res["jax_over_torch_eager"] > 0
  assert res["chunk_over_jit_time"] > 0  # the Trainer's scanned step vs the same body jitted alone
  assert "| digits | 8 | float32 | ce_train |" in out["table"]

  # --gemms: every dense layer's forward, input- and weight-gradient matmul, both libraries.
  assert [(g["layer"], g["op"]) for g in res["gemms"]] == [
      (layer, op) for layer in ("qkv", "proj", "fc1", "fc2")
      for op in ("forward", "input_grad", "weight_grad")]
  rows = 8 * ((8 // 2) ** 2 + 1)  # batch x tokens of the digits ViT (patch 2, width 64)
  assert res["gemms"][0]["rows"] == rows and res["gemms"][0]["outputs"] == 3 * 64
  for g in res["gemms"]:
    assert g["jax_ms"] > 0 and g["torch_ms"] > 0 and g["jax_over_torch"] > 0
  assert f"| digits | 8 | qkv | weight_grad | 64 x {rows} x 192 |" in out["gemm_table"]
