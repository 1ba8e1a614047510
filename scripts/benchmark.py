"""Throughput of the study's steps in JAX, against the same CE step in PyTorch.

  python scripts/benchmark.py --model ti16 --batch_sizes 8,64 --dtype float32
  python scripts/benchmark.py --model digits --batch_sizes 64 --out /tmp/digits.json
  python scripts/benchmark.py --configs ti16:8,digits:64 --omp_wait_policy PASSIVE
  python scripts/benchmark.py --quick          # digits, batch 8, a few steps (the test)

For each (model, batch size, dtype) it measures, on JAX's default backend:
  * the steps of the study through `train.Trainer`'s own compiled chunk functions
    (`steps_per_chunk` steps per call, one `lax.scan`): the CE train step, the
    unlearning steps (negated CE, KL to uniform, contrastive + retain CE), and
    evaluation (`Trainer._predict_fn`, a `lax.map` over batches);
  * the same CE train step written the straightforward PyTorch way: transformers'
    `ViTForImageClassification`, eager (sdpa and eager attention, the faster
    reported; called in turn with the JAX CE step, round by round, so a busy
    machine slows both alike) and under `torch.compile` (right after, in a
    subprocess with a timeout);
  * a large jitted matmul in float32 and bfloat16: the machine's practical peak;
  * with --gemms, each dense layer's three matmuls (forward, input and weight
    gradient) alone, in JAX and in PyTorch: how fast the two libraries' GEMM
    kernels are at the step's shapes, apart from everything else in the step.

Also `ce_train_jit`: the CE step body in a plain jit, one dispatch per step (not
what the study runs; it isolates what the chunk's lax.scan costs).

Images are synthetic uint8 at their stored size, resized and normalised inside
the step, as in the study: ti16 stores 32x32x3 (CIFAR-10) and resizes to 224;
digits stores 8x8x1 at model resolution. Steps time whole chunk calls after
`jax.block_until_ready` and report the median (and the minimum). FLOPs come
from XLA's cost analysis of the compiled chunk (see `_loop_body_counted_once`:
XLA counts a while-loop body once, whatever the trip count), next to the
hand-counted matmul FLOPs of the ViT (`vit_forward_flops`).

Writes `--out` (JSON) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
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

_REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))  # runs from a checkout without `pip install -e .` as well

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import config as config_lib, datasets, model as model_lib, objectives, train
from jaxunlearn.methods import two_stage

_NUM_CLASSES = 10
_LEARNING_RATE = 1e-4  # small, so random data never drives the loss to NaN mid-benchmark

def _model_spec(name: str) -> dict[str, Any]:
  """How a model's images are stored (size, channels, white value) and its ViT sizes."""
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


# Step name -> (objective, {batch key the objective reads: pool it draws from}, sign),
# as the methods' phases set them (gradient ascent: CE with sign -1).
def _jax_steps() -> dict[str, tuple[Callable, dict[str, str], float]]:
  temperature = config_lib.get_base_config().two_stage.temperature
  return {
      "ce_train": (objectives.cross_entropy, {"data": "all"}, 1.0),
      "negated_ce": (objectives.cross_entropy, {"data": "forget"}, -1.0),
      "kl_uniform": (objectives.kl_uniform, {"data": "forget"}, 1.0),
      "contrastive_retain": (two_stage._stage2_objective(temperature),
                             {"forget": "forget", "retain": "retain"}, 1.0),
  }


MODELS = ("ti16", "digits")
STEP_NAMES = ("ce_train", "ce_train_jit", "negated_ce", "kl_uniform", "contrastive_retain", "eval")


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


def _chunk_inputs(trainer: train.Trainer, pools: dict[str, str], sign: float = 1.0):
  """xs of one chunk (steps_per_chunk steps), exactly as Trainer.run feeds its chunk function."""
  num_steps = trainer.steps_per_chunk
  streams = {}
  for i, (name, pool_name) in enumerate(sorted(pools.items())):
    pool = trainer.pools[pool_name]
    keys = train.stream_keys(jax.random.key(i), int(pool.shape[0]), batch_size=trainer.batch_size,
                             num_chunks=1, chunk=num_steps)
    streams[name] = trainer.chunk_table(keys, pool, 0, num_steps)
  return dict(active=np.ones(num_steps, bool), sign=np.full(num_steps, sign, np.float32),
              streams=streams)


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


def _flops(compiled, lowered, num_devices: int, steps_in_cost: int) -> dict:
  # The compiled module is one device's partitioned program: scale by the devices
  # (replicated work such as the SGD update then counts once per device, as it runs).
  per_call = compiled.cost_analysis()["flops"] * num_devices
  per_call_lowered = lowered.cost_analysis()["flops"]  # the global, unpartitioned program
  return dict(flops_per_step=per_call / steps_in_cost,
              flops_per_step_lowered=per_call_lowered / steps_in_cost)


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
  scanned = True  # its cost analysis covers a lax.scan of K steps

  def __init__(self, trainer: train.Trainer, params, objective, pools: dict[str, str],
               sign: float):
    self.K = trainer.steps_per_chunk
    self.examples_per_step = trainer.batch_size * len(pools)  # images through the model
    fn = trainer._chunk_fn(objective, tuple(sorted(pools)))
    self.xs = _chunk_inputs(trainer, pools, sign)
    self.state = _fresh_state(trainer, params)
    self.train = trainer.train
    # The same jit Trainer.run calls; lower+compile ahead of time to time the compile.
    self.lowered, self.compiled, self.compile_info = _compile(
        lambda: fn.lower(self.state, self.train, self.xs))

  def __call__(self):
    # The chunk donates its state: thread it through, as Trainer.run does.
    self.state, metrics = self.compiled(self.state, self.train, self.xs)
    return metrics


class _JaxPlainStep:
  """The CE step body of Trainer._run_chunk in a plain jit: one dispatch per step.

  Not what the study runs: a reference that isolates the cost of the chunk's
  lax.scan (on XLA:CPU the scanned step is slower, more so at large batches).
  """
  scanned = False

  def __init__(self, trainer: train.Trainer, params):
    self.K = trainer.steps_per_chunk  # dispatches per timed call
    self.examples_per_step = trainer.batch_size
    tables = _chunk_inputs(trainer, {"data": "all"})["streams"]["data"]
    idx_B, mask_B = (a[0] for a in tables)
    self.args = (trainer.train, idx_B, mask_B)
    self.state = _fresh_state(trainer, params)

    def step(state, train_data, idx_B, mask_B):
      (images_N, labels_N), (params, opt_state) = train_data, state
      batch = {"data": dict(image=images_N[idx_B], label=labels_N[idx_B], mask=mask_B)}
      (loss, _), grads = jax.value_and_grad(objectives.cross_entropy, argnums=1, has_aux=True)(
          trainer.apply, params, batch)
      updates, opt_state = trainer.tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=trainer.replicated)
    self.lowered, self.compiled, self.compile_info = _compile(
        lambda: jitted.lower(self.state, *self.args))

  def __call__(self):
    for _ in range(self.K):
      self.state, loss = self.compiled(self.state, *self.args)
    return loss


class _JaxEval:
  """Trainer._predict_fn over the test set: `K` batches per call, one lax.map."""
  scanned = True

  def __init__(self, trainer: train.Trainer, params):
    n = int(trainer.test[1].shape[0])
    self.K = -(-n // trainer.eval_width)  # batches per call
    self.examples_per_step = n / self.K
    self.params, self.test = trainer.place(params), trainer.test
    self.lowered, self.compiled, self.compile_info = _compile(
        lambda: trainer._predict_fn.lower(self.params, self.test, num_batches=self.K))

  def __call__(self):
    return self.compiled(self.params, self.test)


def _prepare_jax(step, warmup: int, num_devices: int, body_once: bool) -> dict:
  """First call and warmup calls of a compiled JAX step; its compile times and FLOPs."""
  # XLA counts a scan's body once (see _loop_body_counted_once): then its cost is one step's.
  steps_in_cost = step.K if step.scanned and not body_once else 1
  first_call_s = _time_calls(step, 1, jax.block_until_ready)[0]
  _time_calls(step, warmup, jax.block_until_ready)
  return dict(step.compile_info, first_call_s=first_call_s, steps_per_call=step.K,
              **_flops(step.compiled, step.lowered, num_devices, steps_in_cost))


def _interleaved(calls: dict[str, tuple[Callable, Callable]], num_rounds: int) -> dict[str, list]:
  """Call times of several steps, one call of each per round, so that a neighbour's
  burst of load on a shared machine falls on all of them alike."""
  times = {name: [] for name in calls}
  for _ in range(num_rounds):
    for name, (call, sync) in calls.items():
      times[name] += _time_calls(call, 1, sync)
  return times


# ---------------------------------------------------------------- PyTorch ----

class TorchCEStep:
  """The CE train step written the straightforward PyTorch way; a call runs K steps.

  forward (transformers ViTForImageClassification) + CE + backward + SGD(0.9),
  from the same uint8 images resized and normalised in the step. `spec` is plain
  JSON so the torch.compile variant can run in a subprocess with a timeout.
  """

  def __init__(self, spec: dict):
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(spec["threads"])
    self.device = device = "cuda" if torch.cuda.is_available() else "cpu"
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
    self.opt = torch.optim.SGD(net.parameters(), lr=_LEARNING_RATE, momentum=0.9)

    self.B, self.K = spec["batch_size"], spec["steps_per_call"]
    S, h, pixel_max = vit["image_size"], m["stored_size"], m["pixel_max"]
    bf16 = spec["dtype"] == "bfloat16"
    self.n = max(512, 4 * self.B)
    g = torch.Generator(device="cpu").manual_seed(0)
    self.images_u8_NxCxHxW = torch.randint(0, int(pixel_max) + 1, (self.n, m["channels"], h, h),
                                           dtype=torch.uint8, generator=g).to(device)
    self.labels_N = (torch.arange(self.n) % vit["num_classes"]).to(device)

    def loss_fn(images_u8_BxCxHxW, labels_B):
      x = images_u8_BxCxHxW.float() / pixel_max
      if h != S:
        x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
      x = (x - 0.5) / 0.5
      with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        logits_BxC = net(pixel_values=x).logits
      return F.cross_entropy(logits_BxC.float(), labels_B)

    # Compiling the forward + loss compiles the backward too (AOTAutograd).
    self.loss_fn = torch.compile(loss_fn) if spec["compile"] else loss_fn
    self.torch = torch
    self.info = dict(attn=spec["attn"], compile=spec["compile"], device=device,
                     torch_version=torch.__version__, num_threads=torch.get_num_threads(),
                     steps_per_call=self.K)

  def __call__(self):
    for _ in range(self.K):
      # Drawn on the device: a host-to-device copy would sync the stream every step.
      idx_B = self.torch.randint(0, self.n, (self.B,), device=self.device)
      loss = self.loss_fn(self.images_u8_NxCxHxW[idx_B], self.labels_N[idx_B])
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
    return loss

  def sync(self, _):
    if self.device == "cuda":
      self.torch.cuda.synchronize()


def _prepare_torch(spec: dict) -> tuple[TorchCEStep, dict]:
  step = TorchCEStep(spec)
  first_call_s = _time_calls(step, 1, step.sync)[0]  # includes torch.compile's compile
  _time_calls(step, spec["warmup"], step.sync)
  return step, dict(step.info, first_call_s=first_call_s)


def torch_ce_step(spec: dict) -> dict:
  """Examples/s of TorchCEStep(spec), timed alone (the torch.compile subprocess)."""
  step, info = _prepare_torch(spec)
  return dict(info, **_rates(_time_calls(step, spec["num_calls"], step.sync), step.K, step.B))


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


# ------------------------------------------------------------ dense GEMMs ----

def gemm_shapes(vit: dict, batch_size: int) -> list[tuple[str, int, int, int]]:
  """(layer, rows, in, out) of each dense layer of a ViT block at this batch size."""
  rows = batch_size * ((vit["image_size"] // vit["patch_size"]) ** 2 + 1)
  D, M = vit["hidden_size"], vit["mlp_dim"]
  return [("qkv", rows, D, 3 * D), ("proj", rows, D, D), ("fc1", rows, D, M), ("fc2", rows, M, D)]


def gemm_comparison(vit: dict, batch_size: int, num_calls: int, threads: int) -> list[dict]:
  """Each dense layer's three matmuls, alone, in JAX (jit) and PyTorch on the same data.

  forward x @ W, input gradient dy @ W^T, weight gradient x^T @ dy: the GEMMs that
  take half of a ViT-Ti train step. Tells the kernels' speed apart from the rest
  of the step (layout, fusion, memory), in fp32 on the CPU (or JAX's GPU).
  """
  import torch
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
  torch_sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  ops = {"forward": lambda x, w, dy: (x, w, lambda a, b: a @ b),
         "input_grad": lambda x, w, dy: (dy, w, lambda a, b: a @ b.T),
         "weight_grad": lambda x, w, dy: (x, dy, lambda a, b: a.T @ b)}
  out = []
  for layer, R, I, O in gemm_shapes(vit, batch_size):
    r = np.random.default_rng(0)
    x, w, dy = (r.standard_normal(shape, dtype=np.float32) for shape in ((R, I), (I, O), (R, O)))
    for op, pick in ops.items():
      a, b, f = pick(x, w, dy)
      ja, jb = jnp.asarray(a), jnp.asarray(b)
      jf = jax.jit(f).lower(ja, jb).compile()
      jax.block_until_ready(jf(ja, jb))
      j_s = statistics.median(_time_calls(lambda: jf(ja, jb), num_calls, jax.block_until_ready))
      ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
      torch_sync(f(ta, tb))
      t_s = statistics.median(_time_calls(lambda: f(ta, tb), num_calls, torch_sync))
      gflop = 2 * R * I * O / 1e9
      out.append(dict(layer=layer, op=op, rows=R, inputs=I, outputs=O, jax_ms=1e3 * j_s,
                      torch_ms=1e3 * t_s, jax_gflops_per_s=gflop / j_s,
                      torch_gflops_per_s=gflop / t_s, jax_over_torch=t_s / j_s))
  return out


def gemm_table(results: list[dict]) -> str:
  head = ["model", "batch", "layer", "matmul", "M x K x N", "JAX ms", "PyTorch ms",
          "JAX GFLOP/s", "PyTorch GFLOP/s", "JAX/PyTorch"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for res in results:
    for g in res.get("gemms", []):
      mkn = {"forward": (g["rows"], g["inputs"], g["outputs"]),
             "input_grad": (g["rows"], g["outputs"], g["inputs"]),
             "weight_grad": (g["inputs"], g["rows"], g["outputs"])}[g["op"]]
      rows.append("| " + " | ".join([
          res["model"], str(res["batch_size"]), g["layer"], g["op"], " x ".join(map(str, mkn)),
          _fmt(g["jax_ms"], ".2f"), _fmt(g["torch_ms"], ".2f"), _fmt(g["jax_gflops_per_s"], ".0f"),
          _fmt(g["torch_gflops_per_s"], ".0f"), _fmt(g["jax_over_torch"], ".2f")]) + " |")
  return "\n".join(rows)


# ------------------------------------------------------------- one config ----

def benchmark_config(spec: dict, batch_size: int, dtype: str, args, peak: dict, body_once) -> dict:
  """All JAX steps and the PyTorch CE step for one (model, batch size, dtype)."""
  K = args.steps_per_chunk
  num_calls = max(1, -(-args.steps // K))
  vit = model_lib.ViT(**spec["vit"], dtype=getattr(jnp, dtype))
  params = _init_params(vit, spec["channels"])
  # 20 batches of training images: the forget pool (a tenth) fills two whole batches,
  # so every timed step is a full batch of real examples.
  data = _synthetic_data(spec, num_train=max(512, 20 * batch_size), num_test=K * batch_size)
  trainer = train.Trainer(vit, data, forget_class=0, batch_size=batch_size, momentum=0.9,
                          steps_per_chunk=K, eval_batch_size=batch_size, progress=False)
  n_dev = trainer.mesh.devices.size
  if body_once is None:
    body_once = _loop_body_counted_once()
  once = body_once["loop_body_counted_once"]
  steps = _jax_steps()
  wanted = [s for s in STEP_NAMES if s in args.jax_steps]
  jax_results = {}

  def make_jax(name):
    if name == "eval":
      return _JaxEval(trainer, params)
    if name == "ce_train_jit":
      return _JaxPlainStep(trainer, params)
    return _JaxStep(trainer, params, *steps[name])

  # The CE step: the Trainer's chunk, the same body jitted alone and PyTorch eager,
  # called in turn, round by round, so their ratios hold on a busy machine.
  torch_result = None
  if "ce_train" in wanted:
    print("  jax ce_train (+ ce_train_jit) + pytorch eager ce_train, interleaved ...", flush=True)
    jax_ce = {name: make_jax(name) for name in ("ce_train", "ce_train_jit") if name in wanted}
    calls = {}
    for name, step in jax_ce.items():
      jax_results[name] = _prepare_jax(step, args.warmup, n_dev, once)
      calls[name] = (step, jax.block_until_ready)
    torch_spec = dict(model=spec, batch_size=batch_size, dtype=dtype, steps_per_call=K,
                      num_calls=num_calls, warmup=args.warmup, threads=args.torch_threads)
    eager, torch_steps = {}, {}
    for attn in (args.torch_attn if args.torch else []):
      try:
        torch_steps[attn], eager[attn] = _prepare_torch(dict(torch_spec, attn=attn, compile=False))
        calls[attn] = (torch_steps[attn], torch_steps[attn].sync)
      except Exception as e:  # e.g. an attention implementation this build lacks
        eager[attn] = dict(status=f"failed: {type(e).__name__}: {str(e)[:300]}")
    times = _interleaved(calls, num_calls)
    for name, step in jax_ce.items():
      jax_results[name].update(_rates(times.pop(name), K, step.examples_per_step),
                               interleaved_with=sorted(set(calls) - {name}))
    for attn, t in times.items():
      eager[attn].update(_rates(t, K, batch_size), status="ok")
    del torch_steps, calls  # free the PyTorch models before the next steps
    if args.torch:
      ok = {a: r for a, r in eager.items() if r["status"] == "ok"}
      best = max(ok, key=lambda a: ok[a]["examples_per_s"]) if ok else None
      torch_result = dict(eager=eager, best_attn=best, compile=dict(status="skipped"))
      if args.torch_compile and best:
        print("  pytorch torch.compile ce_train (subprocess) ...", flush=True)
        torch_result["compile"] = _torch_compiled_in_subprocess(
            dict(torch_spec, attn=best, compile=True), args.torch_compile_timeout)

  for name in wanted:
    if name not in jax_results:
      print(f"  jax {name} ...", flush=True)
      step = make_jax(name)
      jax_results[name] = _prepare_jax(step, args.warmup, n_dev, once)
      jax_results[name].update(_rates(_time_calls(step, num_calls, jax.block_until_ready),
                                      step.K, step.examples_per_step))

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
  if "ce_train" in jax_results and "ce_train_jit" in jax_results:
    # > 1: the Trainer's scanned chunk is slower than the same step body jitted alone.
    out["chunk_over_jit_time"] = (jax_results["ce_train"]["ms_per_step"]
                                  / jax_results["ce_train_jit"]["ms_per_step"])
  return out, body_once


# ---------------------------------------------------------------- output ----

def machine_info() -> dict:
  import flax
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
  p.add_argument("--omp_wait_policy", choices=("PASSIVE", "ACTIVE"), default=None,
                 help="OMP_WAIT_POLICY for PyTorch's CPU threads (default: as in the environment). "
                      "PASSIVE keeps eager PyTorch usable when another process holds a core")
  p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--torch_compile_timeout", type=float, default=900.0, help="seconds")
  p.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU/TPU")
  p.add_argument("--gemms", action="store_true",
                 help="also time each dense layer's three matmuls alone, JAX vs PyTorch (fp32)")
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
  if args.omp_wait_policy:
    if "torch" in sys.modules:  # libgomp reads it once, when torch loads
      print("warning: torch is already imported; --omp_wait_policy has no effect", flush=True)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # the torch.compile subprocess inherits it
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
      if args.gemms and dtype == "float32":
        print(f"{m} batch {b}: dense-layer GEMMs, JAX vs PyTorch", flush=True)
        res["gemms"] = gemm_comparison(specs[m]["vit"], b, num_calls=max(3, args.steps // 4),
                                       threads=args.torch_threads)
      results.append(res)
  info["load_average_1m_end"] = os.getloadavg()[0]
  out = dict(machine=info, settings={k: v for k, v in vars(args).items() if k != "torch_worker"},
             matmul_peak=peak, cost_analysis=body_once, results=results,
             total_s=time.perf_counter() - t_start)
  table = markdown_table(results)
  out["table"] = table
  if args.gemms:
    out["gemm_table"] = gemm_table(results)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\npeak matmul GFLOP/s: float32 {peak['float32']['gflops_per_s']:.0f}, "
        f"bfloat16 {peak['bfloat16']['gflops_per_s']:.0f} (JAX, {n}^3)")
  print(table)
  if args.gemms:
    print("\n" + out["gemm_table"])
  print(f"\nwrote {args.out} ({out['total_s']:.0f} s)")
  return out


if __name__ == "__main__":
  main()
