"""Throughput of the study's steps in JAX, against the same CE step in PyTorch.

  python scripts/benchmark.py --model ti16 --batch_sizes 8,64 --dtype float32
  python scripts/benchmark.py --model digits --batch_sizes 64 --out /tmp/digits.json
  python scripts/benchmark.py --quick          # digits, batch 8, a few steps (the test)

For each (model, batch size, dtype) it measures, on JAX's default backend:
  * the steps of the study through `train.Trainer`'s own compiled chunk functions
    (`steps_per_chunk` steps per call, one `lax.scan`): the CE train step, the
    unlearning steps (negated CE, KL to uniform, contrastive + retain CE), and
    evaluation (`Trainer._predict_fn`, a `lax.map` over batches);
  * the same CE train step written the straightforward PyTorch way: transformers'
    `ViTForImageClassification`, eager (sdpa and eager attention, the faster
    reported) and under `torch.compile` (in a subprocess with a timeout), in the
    same run, minutes apart, on the same machine;
  * a large jitted matmul in float32 and bfloat16: the machine's practical peak.

Images are synthetic uint8 at their stored size, resized and normalised inside
the step, as in the study: ti16 stores 32x32x3 (CIFAR-10) and resizes to 224;
digits stores 8x8x1 at model resolution. Steps time whole chunk calls after
`jax.block_until_ready` and report the median. FLOPs come from XLA's cost
analysis of the compiled chunk (see `_loop_body_counted_once`: XLA counts a
while-loop body once, whatever the trip count).

Writes `--out` (JSON) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import config as config_lib, datasets, model as model_lib, objectives, train
from jaxunlearn.methods import two_stage

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NUM_CLASSES = 10
_LEARNING_RATE = 1e-4  # small, so random data never drives the loss to NaN mid-benchmark

# name -> how the images are stored (size, channels, white value) and the ViT's sizes.
def _model_spec(name: str) -> dict[str, Any]:
  if name == "ti16":
    # CIFAR-10 as the study feeds it: 32x32 uint8, bilinear-resized to 224 in the step.
    vit = dict(num_classes=_NUM_CLASSES, image_size=224, layer_norm_eps=1e-6,
               **model_lib.VARIANTS["Ti/16"])
    return dict(name=name, vit=vit, stored_size=32, channels=3, pixel_max=255.0)
  if name == "digits":
    spec = importlib.util.spec_from_file_location("digits_config", _REPO / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    vit = model_lib.model_kwargs(c.model, _NUM_CLASSES)
    return dict(name=name, vit=vit, stored_size=c.model.image_size, channels=1, pixel_max=16.0)
  raise ValueError(f"--model: unknown model {name!r}; allowed: ti16, digits")


# Step name -> (objective, {batch key the objective reads: pool it draws from}).
def _jax_steps() -> dict[str, tuple[Callable, dict[str, str]]]:
  temperature = config_lib.get_base_config().two_stage.temperature
  return {
      "ce_train": (objectives.cross_entropy, {"data": "all"}),
      "negated_ce": (objectives.negated_cross_entropy, {"data": "forget"}),
      "kl_uniform": (objectives.kl_uniform, {"data": "forget"}),
      "contrastive_retain": (two_stage._stage2_objective(temperature),
                             {"forget": "forget", "retain": "retain"}),
  }


MODELS = ("ti16", "digits")
STEP_NAMES = ("ce_train", "negated_ce", "kl_uniform", "contrastive_retain", "eval")


# ---------------------------------------------------------------- timing ----

def _time_calls(call: Callable[[], Any], num_calls: int, sync: Callable[[Any], Any]) -> list[float]:
  times = []
  for _ in range(num_calls):
    t0 = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - t0)
  return times


def _rates(call_times_s: list[float], steps_per_call: int, examples_per_step: float) -> dict:
  step_s = statistics.median(call_times_s) / steps_per_call
  # The minimum too: on a shared machine a neighbour's burst can slow whole calls.
  return dict(ms_per_step=1e3 * step_s, examples_per_s=examples_per_step / step_s,
              ms_per_step_min=1e3 * min(call_times_s) / steps_per_call,
              examples_per_step=examples_per_step, call_times_s=call_times_s)


# ------------------------------------------------------------ JAX steps ----

def _synthetic_data(spec: dict, num_train: int, num_test: int, seed: int = 0) -> datasets.Dataset:
  r = np.random.default_rng(seed)
  shape = (spec["stored_size"], spec["stored_size"], spec["channels"])
  images = lambda n: r.integers(0, int(spec["pixel_max"]) + 1, (n, *shape)).astype(np.uint8)
  # Every class present, so the forget (class 0) and retain pools are never empty.
  labels = lambda n: (np.arange(n) % _NUM_CLASSES).astype(np.int32)
  return datasets.Dataset(images(num_train), labels(num_train), images(num_test), labels(num_test),
                          num_classes=_NUM_CLASSES, pixel_max=spec["pixel_max"],
                          class_names=tuple(map(str, range(_NUM_CLASSES))))


def _fresh_state(trainer: train.Trainer, params):
  # As Trainer.run builds it: replicated params and SGD state with the lr inside.
  params = trainer._copy(params)
  opt_state = trainer.tx.init(params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(_LEARNING_RATE, jnp.float32)
  return params, jax.device_put(opt_state, trainer.replicated)


def _chunk_inputs(trainer: train.Trainer, pools: dict[str, str], num_steps: int):
  """xs of one chunk of `num_steps` steps, exactly as Trainer.run feeds its chunk function."""
  streams = {
      name: train.batch_table(jax.random.key(i), trainer.pools[pool],
                              batch_size=trainer.batch_size, width=trainer.width,
                              num_steps=num_steps, chunk=num_steps)
      for i, (name, pool) in enumerate(sorted(pools.items()))}
  return dict(active=np.ones(num_steps, bool), streams=trainer._take_chunk(streams, 0))


def _loop_body_counted_once() -> dict:
  """Whether XLA's cost analysis counts a scan's body once or trip-count times.

  HloCostAnalysis visits a while loop's body once and ignores the trip count, so
  the cost of a K-step chunk is the cost of one step (with jax 0.10.2 the counts
  of the Trainer's 1-, 2- and 5-step CE chunks agree). Checked on every run, on
  a 1- and a 2-step scan of a matmul, so an XLA that multiplies is noticed.
  """
  def scan_of_matmuls(x_NxN, length):
    return jax.lax.scan(lambda c, _: (c @ x_NxN, None), x_NxN, None, length=length)[0]

  x_NxN = jnp.ones((64, 64), jnp.float32)
  flops = [jax.jit(scan_of_matmuls, static_argnums=1).lower(x_NxN, k).compile()
           .cost_analysis()["flops"] for k in (1, 2)]
  # Not exactly equal: the 2-step loop adds its counter's increment (2 FLOPs).
  return dict(loop_body_counted_once=bool(abs(flops[1] - flops[0]) < 0.01 * flops[0]),
              flops_1_step_scan=flops[0], flops_2_step_scan=flops[1],
              flops_one_matmul=2 * 64**3)


def vit_forward_flops(vit: dict, channels: int) -> float:
  """Matmul FLOPs of one image's forward pass (2 per multiply-add): the "model FLOPs".

  Patch embedding, per block qkv + proj + MLP on every token and the two L x L
  attention products, and the head; elementwise work (LayerNorm, GELU, softmax)
  and the input resize are left out. A train step is ~3x this (forward +
  backward w.r.t. activations and weights).
  """
  S, P, D, M = vit["image_size"], vit["patch_size"], vit["hidden_size"], vit["mlp_dim"]
  N = (S // P) ** 2
  L = N + 1  # patches + class token
  per_block = L * 2 * (4 * D * D + 2 * D * M) + 2 * 2 * L * L * D
  return 2 * N * P * P * channels * D + vit["depth"] * per_block + 2 * D * vit["num_classes"]


def _flops(compiled, lowered, num_devices: int, steps_per_call: int, body_once: bool) -> dict:
  # The compiled module is one device's partitioned program: scale by the devices
  # (replicated work such as the SGD update then counts once per device, as it runs).
  per_call = compiled.cost_analysis()["flops"] * num_devices
  per_call_lowered = lowered.cost_analysis()["flops"]  # the global, unpartitioned program
  div = 1 if body_once else steps_per_call
  return dict(flops_per_step=per_call / div, flops_per_step_lowered=per_call_lowered / div)


# XLA options of every compile; --quick sets backend optimisation level 0, which
# halves the CPU compile time of a smoke test (its steps then run ~3x slower).
_COMPILER_OPTIONS: dict[str, Any] = {}


def _compile(fn_lower: Callable[[], Any]) -> tuple[Any, Any, dict]:
  t0 = time.perf_counter()
  lowered = fn_lower()
  t1 = time.perf_counter()
  compiled = lowered.compile(compiler_options=_COMPILER_OPTIONS or None)
  t2 = time.perf_counter()
  return lowered, compiled, dict(lower_s=t1 - t0, compile_s=(t1 - t0) + (t2 - t1), xla_compile_s=t2 - t1)


def _init_params(vit: model_lib.ViT, channels: int):
  # model_lib.init_params, but compiled with _COMPILER_OPTIONS (--quick's compile time).
  images = jnp.zeros((1, vit.image_size, vit.image_size, channels), jnp.float32)
  _, init, _ = _compile(lambda: jax.jit(lambda r: vit.init(r, images)["params"]).lower(jax.random.key(0)))
  return init(jax.random.key(0))


class _JaxStep:
  """One of the Trainer's compiled chunk functions, ready to time repeatedly."""

  def __init__(self, trainer: train.Trainer, params, objective, pools: dict[str, str]):
    self.K = trainer.steps_per_chunk
    self.examples_per_step = trainer.batch_size * len(pools)  # images through the model
    fn = trainer._chunk_fn(objective, tuple(sorted(pools)))
    self.xs = _chunk_inputs(trainer, pools, self.K)
    self.state = _fresh_state(trainer, params)
    self.train = trainer.train
    # The same jit Trainer.run calls; lower+compile ahead of time to time the compile.
    self.lowered, self.compiled, self.compile_info = _compile(
        lambda: fn.lower(self.state, self.train, self.xs))

  def __call__(self):
    # The chunk donates its state: thread it through, as Trainer.run does.
    self.state, metrics = self.compiled(self.state, self.train, self.xs)
    return metrics


class _JaxEval:
  """Trainer._predict_fn over the test set: `K` batches per call, one lax.map."""

  def __init__(self, trainer: train.Trainer, params):
    n = int(trainer.test[1].shape[0])
    self.K = -(-n // trainer.eval_width)  # batches per call
    self.examples_per_step = n / self.K
    self.params, self.test = trainer.place(params), trainer.test
    self.lowered, self.compiled, self.compile_info = _compile(
        lambda: trainer._predict_fn.lower(self.params, self.test, num_batches=self.K))

  def __call__(self):
    return self.compiled(self.params, self.test)


def _measure_jax(step, num_calls: int, warmup: int, num_devices: int, body_once: bool) -> dict:
  t0 = time.perf_counter()
  jax.block_until_ready(step())
  first_call_s = time.perf_counter() - t0
  _time_calls(step, warmup, jax.block_until_ready)
  out = dict(step.compile_info, first_call_s=first_call_s, steps_per_call=step.K,
             **_flops(step.compiled, step.lowered, num_devices, step.K, body_once))
  out.update(_rates(_time_calls(step, num_calls, jax.block_until_ready), step.K,
                    step.examples_per_step))
  return out


def _more_calls(step, result: dict, num_calls: int) -> dict:
  """Re-times an already measured step (after PyTorch ran) and pools all its calls."""
  times = result["call_times_s"] + _time_calls(step, num_calls, jax.block_until_ready)
  return dict(result, **_rates(times, step.K, step.examples_per_step),
              median_before_torch_ms=1e3 * statistics.median(result["call_times_s"]) / step.K,
              median_after_torch_ms=1e3 * statistics.median(times[len(result["call_times_s"]):]) / step.K)


# ---------------------------------------------------------------- PyTorch ----

def torch_ce_step(spec: dict) -> dict:
  """Examples/s of the CE train step written the straightforward PyTorch way.

  forward (transformers ViTForImageClassification) + CE + backward + SGD(0.9),
  from the same uint8 images resized and normalised in the step. `spec` is plain
  JSON so the torch.compile variant can run it in a subprocess with a timeout.
  """
  import torch
  import torch.nn.functional as F
  import transformers

  torch.set_num_threads(spec["threads"])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    # JAX's default float32 matmul precision on GPUs is TF32; match it.
    torch.set_float32_matmul_precision("high")
  torch.manual_seed(0)
  m, vit = spec["model"], spec["model"]["vit"]
  config = transformers.ViTConfig(
      hidden_size=vit["hidden_size"], num_hidden_layers=vit["depth"],
      num_attention_heads=vit["num_heads"], intermediate_size=vit["mlp_dim"],
      image_size=vit["image_size"], patch_size=vit["patch_size"], num_channels=m["channels"],
      num_labels=vit["num_classes"], hidden_act="gelu", layer_norm_eps=vit["layer_norm_eps"],
      qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  net = transformers.ViTForImageClassification._from_config(
      config, attn_implementation=spec["attn"]).to(device).train()
  opt = torch.optim.SGD(net.parameters(), lr=_LEARNING_RATE, momentum=0.9)

  B, K, S, h = spec["batch_size"], spec["steps_per_call"], vit["image_size"], m["stored_size"]
  pixel_max, bf16 = m["pixel_max"], spec["dtype"] == "bfloat16"
  n = max(512, 4 * B)
  g = torch.Generator(device="cpu").manual_seed(0)
  images_u8_NxCxHxW = torch.randint(0, int(pixel_max) + 1, (n, m["channels"], h, h),
                                    dtype=torch.uint8, generator=g).to(device)
  labels_N = (torch.arange(n) % vit["num_classes"]).to(device)

  def loss_fn(images_u8_BxCxHxW, labels_B):
    x = images_u8_BxCxHxW.float() / pixel_max
    if h != S:
      x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      logits_BxC = net(pixel_values=x).logits
    return F.cross_entropy(logits_BxC.float(), labels_B)

  if spec["compile"]:
    # Compiling the forward + loss compiles the backward too (AOTAutograd).
    loss_fn = torch.compile(loss_fn)

  def chunk():
    for _ in range(K):
      idx_B = torch.randint(0, n, (B,), generator=g).to(device)
      loss = loss_fn(images_u8_NxCxHxW[idx_B], labels_N[idx_B])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    return loss

  sync = lambda _: torch.cuda.synchronize() if device == "cuda" else None
  first_call_s = _time_calls(chunk, 1, sync)[0]  # includes torch.compile's compile
  _time_calls(chunk, spec["warmup"], sync)
  out = dict(attn=spec["attn"], compile=spec["compile"], device=device,
             torch_version=torch.__version__, num_threads=torch.get_num_threads(),
             first_call_s=first_call_s, steps_per_call=K)
  out.update(_rates(_time_calls(chunk, spec["num_calls"], sync), K, B))
  return out


def _torch_compiled_in_subprocess(spec: dict, timeout_s: float) -> dict:
  """torch.compile's run, or {"status": "failed: ..."}: a fresh process, so a hang can be killed."""
  cmd = [sys.executable, os.path.abspath(__file__), "--torch_worker", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(status=f"failed: took more than {timeout_s:.0f} s")
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(status=f"failed: {err[:300]}")
  return dict(json.loads(lines[-1]), status="ok")


def _measure_torch(spec: dict, attns: list[str], compile_: bool, timeout_s: float) -> dict:
  eager = {}
  for attn in attns:
    try:
      eager[attn] = dict(torch_ce_step(dict(spec, attn=attn, compile=False)), status="ok")
    except Exception as e:  # e.g. an attention implementation this build lacks
      eager[attn] = dict(status=f"failed: {type(e).__name__}: {str(e)[:300]}")
  ok = {a: r for a, r in eager.items() if r["status"] == "ok"}
  best = max(ok, key=lambda a: ok[a]["examples_per_s"]) if ok else None
  out = dict(eager=eager, best_attn=best)
  if compile_ and best:
    out["compile"] = _torch_compiled_in_subprocess(dict(spec, attn=best, compile=True), timeout_s)
  else:
    out["compile"] = dict(status="skipped")
  return out


# ------------------------------------------------------------ matmul peak ----

def matmul_peak(n: int, dtype, num_calls: int) -> dict:
  """GFLOP/s of one jitted (n, n) @ (n, n) on JAX's default device: the practical peak."""
  ka, kb = jax.random.split(jax.random.key(0))
  a_NxN, b_NxN = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in (ka, kb))
  dot = jax.jit(jnp.dot).lower(a_NxN, b_NxN).compile()
  jax.block_until_ready(dot(a_NxN, b_NxN))
  s = statistics.median(_time_calls(lambda: dot(a_NxN, b_NxN), num_calls, jax.block_until_ready))
  return dict(n=n, ms=1e3 * s, gflops_per_s=2 * n**3 / s / 1e9)


def torch_matmul_peak(n: int, dtype: str, num_calls: int, threads: int) -> dict:
  """The same matmul in PyTorch, for context on the JAX / PyTorch ratio."""
  import torch
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  sync(a @ b)
  s = statistics.median(_time_calls(lambda: a @ b, num_calls, sync))
  return dict(n=n, ms=1e3 * s, gflops_per_s=2 * n**3 / s / 1e9)


# ------------------------------------------------------------- one config ----

def benchmark_config(spec: dict, batch_size: int, dtype: str, args, peak: dict, body_once) -> dict:
  """All JAX steps and the PyTorch CE step for one (model, batch size, dtype)."""
  K = args.steps_per_chunk
  num_calls = max(1, -(-args.steps // K))
  vit = model_lib.ViT(**spec["vit"], dtype=getattr(jnp, dtype))
  params = _init_params(vit, spec["channels"])
  data = _synthetic_data(spec, num_train=max(512, 4 * batch_size), num_test=K * batch_size)
  trainer = train.Trainer(vit, data, forget_class=0, batch_size=batch_size, momentum=0.9,
                          steps_per_chunk=K, eval_batch_size=batch_size, progress=False)
  n_dev = trainer.mesh.devices.size
  if body_once is None:
    body_once = _loop_body_counted_once()
  once = body_once["loop_body_counted_once"]
  steps = _jax_steps()
  wanted = [s for s in STEP_NAMES if s in args.jax_steps]
  jax_results, runners = {}, {}

  def run_jax(name):
    print(f"  jax {name} ...", flush=True)
    runner = _JaxEval(trainer, params) if name == "eval" else _JaxStep(trainer, params, *steps[name])
    runners[name] = runner
    jax_results[name] = _measure_jax(runner, num_calls, args.warmup, n_dev, once)

  # JAX CE, then PyTorch, then JAX CE again: the ratio compares runs minutes apart.
  if "ce_train" in wanted:
    run_jax("ce_train")
  torch_spec = dict(model=spec, batch_size=batch_size, dtype=dtype, steps_per_call=K,
                    num_calls=num_calls, warmup=args.warmup, threads=args.torch_threads)
  print("  pytorch ce_train ...", flush=True)
  torch_result = _measure_torch(torch_spec, args.torch_attn, args.torch_compile,
                                args.torch_compile_timeout) if args.torch else None
  if "ce_train" in wanted and torch_result is not None:
    jax_results["ce_train"] = _more_calls(runners["ce_train"], jax_results["ce_train"], num_calls)
  for name in wanted:
    if name != "ce_train":
      run_jax(name)

  peak_gflops = peak[dtype]["gflops_per_s"]
  forward_flops = vit_forward_flops(spec["vit"], spec["channels"])
  for name, r in jax_results.items():
    r["gflops_per_s"] = r["flops_per_step"] / (r["ms_per_step"] / 1e3) / 1e9
    r["fraction_of_peak"] = r["gflops_per_s"] / peak_gflops
    passes = 1 if name == "eval" else 3
    r["model_flops_per_step"] = passes * forward_flops * r["examples_per_step"]
    r["xla_over_model_flops"] = r["flops_per_step"] / r["model_flops_per_step"]
  out = dict(model=spec["name"], batch_size=batch_size, dtype=dtype, num_devices=n_dev,
             num_params=model_lib.num_params(params),
             input=(f"uint8 {spec['stored_size']}x{spec['stored_size']}x{spec['channels']}"
                    + (f", bilinear-resized to {spec['vit']['image_size']} in the step"
                       if spec["stored_size"] != spec["vit"]["image_size"] else ", at model size")),
             jax=jax_results, torch=torch_result)
  if torch_result and "ce_train" in jax_results:
    jax_eps = jax_results["ce_train"]["examples_per_s"]
    best = torch_result["best_attn"]
    if best:
      out["jax_over_torch_eager"] = jax_eps / torch_result["eager"][best]["examples_per_s"]
    if torch_result["compile"].get("status") == "ok":
      out["jax_over_torch_compile"] = jax_eps / torch_result["compile"]["examples_per_s"]
  return out, body_once


# ---------------------------------------------------------------- output ----

def machine_info() -> dict:
  import flax
  import optax
  info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
              jax_devices=[str(d) for d in jax.devices()], jax_backend=jax.default_backend(),
              platform=platform.platform(), python=platform.python_version(),
              cpu_count=os.cpu_count(), jax_version=jax.__version__, flax_version=flax.__version__,
              optax_version=optax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
              load_average_1m=os.getloadavg()[0])
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    info["cpu_model"] = platform.processor()
  try:
    import torch
    import transformers
    info.update(torch_version=torch.__version__, transformers_version=transformers.__version__,
torch_cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name()
  except ImportError:
    info["torch_version"] = None
  return info


def _fmt(x, spec=".1f", scale=1.0):
  return "" if x is None else format(x * scale, spec)


def markdown_table(results: list[dict]) -> str:
  head = ["model", "batch", "dtype", "step", "ex/s", "ms/step", "GFLOP/s", "% of peak",
          "compile s", "PyTorch eager ex/s", "torch.compile ex/s", "JAX/PyTorch", "JAX/compile"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for res in results:
    t = res.get("torch") or {}
    eager = t.get("eager", {}).get(t.get("best_attn"), {})
    comp = t.get("compile", {})
    for step, r in res["jax"].items():
      torch_cols = ["", "", "", ""]
      if step == "ce_train" and t:
        torch_cols = [
            f"{eager['examples_per_s']:.1f} ({t['best_attn']})" if eager else "failed",
            _fmt(comp.get("examples_per_s")) or comp.get("status", ""),
            _fmt(res.get("jax_over_torch_eager"), ".2f"),
            _fmt(res.get("jax_over_torch_compile"), ".2f")]
      rows.append("| " + " | ".join([
          res["model"], str(res["batch_size"]), res["dtype"], step,
          _fmt(r["examples_per_s"]), _fmt(r["ms_per_step"]), _fmt(r["gflops_per_s"]),
          _fmt(r["fraction_of_peak"], ".1f", 100), _fmt(r["compile_s"]), *torch_cols]) + " |")
  return "\n".join(rows)


# ------------------------------------------------------------------ main ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="ti16", help="comma-separated: ti16, digits")
  p.add_argument("--batch_sizes", default="8,64", help="comma-separated batch sizes")
  p.add_argument("--configs", default="",
                 help="comma-separated model:batch pairs, e.g. ti16:8,digits:64 "
                      "(instead of every --model x --batch_sizes)")
  p.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16 (compute)")
  p.add_argument("--steps", type=int, default=20, help="measured steps per step kind")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
  p.add_argument("--steps_per_chunk", type=int, default=5, help="steps per compiled call")
  p.add_argument("--jax_steps", default=",".join(STEP_NAMES), help="comma-separated steps to time")
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the PyTorch CE step")
  p.add_argument("--torch_attn", default="sdpa,eager",
                 help="transformers attention implementations to try; the faster is reported")
  p.add_argument("--torch_threads", type=int, default=os.cpu_count(),
                 help="torch.set_num_threads (default: all CPUs)")
  p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--torch_compile_timeout", type=float, default=900.0, help="seconds")
  p.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU/TPU")
  p.add_argument("--out", default="benchmark.json")
  p.add_argument("--fast_compile", action="store_true",
                 help="XLA backend optimisation level 0: faster compiles, slower steps")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: digits, batch 8, 4 steps, fast compiles, 1 torch thread, no torch.compile")
  p.add_argument("--torch_worker", help=argparse.SUPPRESS)  # internal: one torch_ce_step(spec)
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.batch_sizes, args.steps, args.steps_per_chunk = "digits", "8", 4, 2
    args.warmup, args.torch_compile, args.torch_attn, args.matmul_size = 0, False, "sdpa", 256
    args.fast_compile, args.torch_threads = True, 1  # a smoke test: its numbers mean little
  if args.configs:
    pairs = [c.split(":") for c in args.configs.split(",")]
    if any(len(pair) != 2 or not pair[1].isdigit() for pair in pairs):
      p.error(f"--configs: expected model:batch pairs, got {args.configs!r}")
    args.configs = [(m, int(b)) for m, b in pairs]
  else:
    args.configs = [(m, int(b)) for m in args.model.split(",") for b in args.batch_sizes.split(",")]
  args.dtypes = args.dtype.split(",")
  args.jax_steps = args.jax_steps.split(",")
  args.torch_attn = args.torch_attn.split(",")
  for m, _ in args.configs:
    if m not in MODELS:
      p.error(f"--model: unknown model {m!r}; allowed: {', '.join(MODELS)}")
  for d in args.dtypes:
    if d not in ("float32", "bfloat16"):
      p.error(f"--dtype: unknown dtype {d!r}; allowed: float32, bfloat16")
  for s in args.jax_steps:
    if s not in STEP_NAMES:
      p.error(f"--jax_steps: unknown step {s!r}; allowed: {', '.join(STEP_NAMES)}")
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.torch_worker:
    print(json.dumps(torch_ce_step(json.loads(args.torch_worker))))
    return {}
  specs = {m: _model_spec(m) for m, _ in args.configs}  # a bad --model fails before any work
  _COMPILER_OPTIONS.clear()
  if args.fast_compile:
    _COMPILER_OPTIONS["xla_backend_optimization_level"] = 0
  t_start = time.perf_counter()
  info = machine_info()
  n = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
  print(f"matmul peak ({n}^3) ...", flush=True)
  peak = {d: matmul_peak(n, getattr(jnp, d), num_calls=5) for d in ("float32", "bfloat16")}
  if args.torch:
    peak["torch"] = {d: torch_matmul_peak(n, d, num_calls=5, threads=args.torch_threads)
                     for d in ("float32", "bfloat16")}
  results, body_once = [], None
  for m, b in args.configs:
    for dtype in args.dtypes:
      print(f"{m} batch {b} {dtype}", flush=True)
      res, body_once = benchmark_config(specs[m], b, dtype, args, peak, body_once)
      results.append(res)
  info["load_average_1m_end"] = os.getloadavg()[0]
  out = dict(machine=info, settings={k: v for k, v in vars(args).items() if k != "torch_worker"},
             matmul_peak=peak, cost_analysis=body_once, results=results,
             total_s=time.perf_counter() - t_start)
  table = markdown_table(results)
  out["table"] = table
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\npeak matmul GFLOP/s: float32 {peak['float32']['gflops_per_s']:.0f}, "
        f"bfloat16 {peak['bfloat16']['gflops_per_s']:.0f} (JAX, {n}^3)")
  print(table)
  print(f"\nwrote {args.out} ({out['total_s']:.0f} s)")
  return out


if __name__ == "__main__":
  main()
