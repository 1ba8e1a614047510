"""The benchmark's output: the machine it ran on, and its results as Markdown tables."""
from __future__ import annotations

import datetime
import os
import platform


def machine_info() -> dict:
  """Versions, devices, CPU and load: what a number needs beside it to be compared."""
  import flax
  import jax
  import optax
  info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
              jax_devices=[str(d) for d in jax.devices()], jax_backend=jax.default_backend(),
              platform=platform.platform(), python=platform.python_version(),
              cpu_count=os.cpu_count(), jax_version=jax.__version__, flax_version=flax.__version__,
              optax_version=optax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
              omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
              load_average_1m=os.getloadavg()[0])
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    info["cpu_model"] = platform.processor()
  try:
    import torch
    info.update(torch_version=torch.__version__, torch_cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name()
  except ImportError:
    info["torch_version"] = None
  try:
    import transformers  # the PyTorch ViT only
    info["transformers_version"] = transformers.__version__
  except ImportError:
    info["transformers_version"] = None
  return info


def _fmt(x, spec=".1f", scale=1.0):
  return "" if x is None else format(x * scale, spec)


def _row(cells) -> str:
  return "| " + " | ".join(cells) + " |"


def markdown_table(results: list[dict]) -> str:
  """One row per timed JAX row; the PyTorch columns on the CE step's row."""
  head = ["model", "batch", "dtype", "step", "ex/s", "ms/step", "ms/call", "GFLOP/s",
          "% of peak", "compile s", "PyTorch eager ex/s", "torch.compile ex/s", "JAX/PyTorch",
          "JAX/compile"]
  rows = [_row(head), "|" + "---|" * len(head)]
  for res in results:
    t = res.get("torch") or {}
    eager = t.get("eager", {}).get(t.get("best_variant"), {})
    comp = t.get("compile", {})
    for step, r in res["jax"].items():
      torch_cols = ["", "", "", ""]
      if step == "ce_train" and t:
        torch_cols = [
            f"{eager['examples_per_s']:.1f} ({t['best_variant']})" if eager else "failed",
            _fmt(comp.get("examples_per_s")) or comp.get("status", ""),
            _fmt(res.get("jax_over_torch_eager"), ".2f"),
            _fmt(res.get("jax_over_torch_compile"), ".2f")]
      compile_s = ("~" if r.get("compile_s_estimated") else "") + _fmt(r["compile_s"])
      if r.get("compiled_by", step) != step:
        compile_s += f" (as {r['compiled_by']})"
      rows.append(_row([
          res["model"], str(res["batch_size"]), res["dtype"], step,
          _fmt(r.get("examples_per_s")), _fmt(r.get("ms_per_step")), _fmt(r.get("ms_per_call")),
          _fmt(r.get("gflops_per_s")), _fmt(r.get("fraction_of_peak"), ".1f", 100), compile_s,
          *torch_cols]))
  return "\n".join(rows)


def gemm_table(results: list[dict]) -> str:
  head = ["model", "batch", "layer", "matmul", "M x K x N", "JAX ms", "PyTorch ms",
          "JAX GFLOP/s", "PyTorch GFLOP/s", "JAX/PyTorch"]
  rows = [_row(head), "|" + "---|" * len(head)]
  for res in results:
    for g in res.get("gemms", []):
      mkn = {"forward": (g["rows"], g["inputs"], g["outputs"]),
             "input_grad": (g["rows"], g["outputs"], g["inputs"]),
             "weight_grad": (g["inputs"], g["rows"], g["outputs"])}[g["op"]]
      rows.append(_row([
          res["model"], str(res["batch_size"]), g["layer"], g["op"], " x ".join(map(str, mkn)),
          _fmt(g["jax_ms"], ".2f"), _fmt(g["torch_ms"], ".2f"), _fmt(g["jax_gflops_per_s"], ".0f"),
          _fmt(g["torch_gflops_per_s"], ".0f"), _fmt(g["jax_over_torch"], ".2f")]))
  return "\n".join(rows)
