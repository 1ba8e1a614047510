"""Throughput of the study's steps in JAX, against the same CE step in PyTorch.

  python scripts/benchmark.py --model ti16 --batch_sizes 8,64 --dtype float32
  python scripts/benchmark.py --model digits --batch_sizes 64 --methods two_stage,scrub
  python scripts/benchmark.py --configs ti16:8,digits:64 --omp_wait_policy PASSIVE
  python scripts/benchmark.py --configs ti16:64 --jax_steps eval --methods none --no-torch --gemms
  python scripts/benchmark.py --quick   # 1-block digits ViT, batch 8, 2 steps per call: the test
                                        # (~40-60 s on the 2-core CPU, nearly all compiling)

For each (model, batch size, dtype) it measures, on JAX's default backend and only
through `train.Trainer`'s public API, so what is timed is what the pipeline runs:
  * the CE train step: a `Trainer.stepper` of the Original's recipe
    (`methods.original.recipe(config.train)`); a call runs `steps_per_chunk` steps
    in one compiled `lax.scan`;
  * every unlearning method of `methods.METHODS` (`--methods`), its recipe built
    from its base-config section: `Trainer.prepare` (the method's prepare sweep,
    where it has one; whole calls, row `<method>/prepare`), then one
    `Trainer.stepper` per distinct step of the recipe (objective and streams; row
    `<method>/<objective>`). A method without phases (SSD) is timed as whole
    `Trainer.run` calls instead (its prepare sweeps and its edit; row `<method>/run`).
    All the methods' rows are compiled and called once first (`--compile_threads`
    at a time), then each is timed alone, `--method_steps` steps (whole calls);
  * evaluation: whole `Trainer.predict` calls over the test set (a `lax.map` over batches);
  * the same CE train step written the straightforward PyTorch way: transformers'
    `ViTForImageClassification`, eager (sdpa and eager attention, the faster
    reported; called in turn with the JAX CE step, round by round, so a busy
    machine slows both alike) and under `torch.compile` (right after, in a
    subprocess with a timeout);
  * a large jitted matmul in float32 and bfloat16: the machine's practical peak;
  * with --gemms, each dense layer's three matmuls (forward, input and weight
    gradient) alone, in JAX and in PyTorch: how fast the two libraries' GEMM
    kernels are at the step's shapes, apart from everything else in the step.

What the public API does not give, and is therefore no longer measured: the CE
step in a plain jit, one dispatch per step (`ce_train_jit`, which isolated what
the chunk's lax.scan costs; it needs the Trainer's private step body and
optimizer), and XLA's cost analysis of a compiled chunk (the Trainer does not hand
out its compiled functions). GFLOP/s and the fraction of the matmul peak count
model FLOPs instead: the ViT's matmuls counted by hand (`vit_forward_flops`), 3
forward passes' worth per trained image and 1 per evaluated one. Prepare sweeps
and SSD's run have no such count, and no steps: they report ms per call only.

Compile seconds: a stepper's `compile_seconds`, a prepare or run row's change of
`Trainer.compile_seconds()` over its first call (with --compile_threads > 1 they
include waiting for the CPU). A step whose function an earlier row compiled (same
objective, stream names and input shapes; e.g. fine-tuning's CE step is the
Original's) reuses that compile and says so (`compiled_by`).
Evaluation's jit is not on the Trainer's clock: its compile time is estimated as
its first call minus its median call.

Images are synthetic uint8 at their stored size, resized and normalised inside
the step, as in the study: ti16 stores 32x32x3 (CIFAR-10) and resizes to 224;
digits stores 8x8x1 at model resolution. Class 0 is forgotten (a tenth of the
training set, two full batches or more). Calls are timed after
`jax.block_until_ready`; rows report the median call (and the minimum).

Writes `--out` (JSON) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
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

if __name__ == "__main__" and {"--quick", "--fast_compile"} & set(sys.argv):
  # The Trainer compiles with XLA's defaults, so the optimisation level can only come
  # from XLA_FLAGS, which XLA reads once, when JAX starts: here, before jax loads.
  # Level 0 halves a smoke test's CPU compile time (its steps then run ~2x slower).
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import config as config_lib, datasets, model as model_lib, scenario, train
from jaxunlearn.methods import METHODS, original

_NUM_CLASSES = 10
_FORGET_CLASS = 0


def _model_spec(name: str, depth: int = 0) -> dict[str, Any]:
  """How a model's images are stored (size, channels, white value) and its ViT sizes.

  depth > 0 replaces the model's number of blocks (--quick: one block, a fast compile).
  """
  if name == "ti16":
    # CIFAR-10 as the study feeds it: 32x32 uint8, bilinear-resized to 224 in the step.
    vit = dict(num_classes=_NUM_CLASSES, image_size=224, layer_norm_eps=1e-6,
               **model_lib.VARIANTS["Ti/16"])
    spec = dict(name=name, vit=vit, stored_size=32, channels=3, pixel_max=255.0)
  elif name == "digits":
    module_spec = importlib.util.spec_from_file_location("digits_config",
                                                         _REPO / "configs" / "digits.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    c = module.get_config()
    vit = model_lib.model_kwargs(c.model, _NUM_CLASSES)
    spec = dict(name=name, vit=vit, stored_size=c.model.image_size, channels=1, pixel_max=16.0)
  else:
    raise ValueError(f"--model: unknown model {name!r}; allowed: ti16, digits")
  if depth:
    spec["vit"] = dict(spec["vit"], depth=depth)
  return spec


MODELS = ("ti16", "digits")
# Rows besides the methods' (--jax_steps).
STEP_NAMES = ("ce_train", "eval")


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



def _interleaved(calls: dict[str, tuple[Callable, Callable]], num_rounds: int) -> dict[str, list]:
  """Call times of several steps, one call of each per round, so that a neighbour's
  burst of load on a shared machine falls on all of them alike."""
  times = {name: [] for name in calls}
  for _ in range(num_rounds):
    for name, (call, sync) in calls.items():
      times[name] += _time_calls(call, 1, sync)
  return times


# ------------------------------------------------------------ JAX steps ----

def _synthetic_data(spec: dict, num_train: int, num_test: int, seed: int = 0) -> datasets.Dataset:
  r = np.random.default_rng(seed)
  shape = (spec["stored_size"], spec["stored_size"], spec["channels"])
  images = lambda n: r.integers(0, int(spec["pixel_max"]) + 1, (n, *shape)).astype(np.uint8)
  # Every class present, so the forget and retain pools are never empty.
  labels = lambda n: (np.arange(n) % _NUM_CLASSES).astype(np.int32)
  return datasets.Dataset(images(num_train), labels(num_train), images(num_test), labels(num_test),
                          num_classes=_NUM_CLASSES, pixel_max=spec["pixel_max"],
                          class_names=tuple(map(str, range(_NUM_CLASSES))))


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


def _step_kinds(recipe: train.Recipe) -> list[train.Phase]:
  """The first phase of each distinct step of a recipe: its objective and streams.

  Phases that differ only in length, optimizer settings or hyperparameters run
  the same compiled step at the same cost (those are traced inputs of the step).
  """
  seen = {}
  for phase in recipe.phases:
    key = (phase.objective, tuple(sorted((k, s.pool) for k, s in phase.streams.items())))
    seen.setdefault(key, phase)
  return list(seen.values())


def _row_names(method: str, phases: list[train.Phase]) -> list[str]:
  """`<method>/<objective>`; the phase's name is added where two steps share an objective."""
  names = [p.objective.__name__ for p in phases]
  return [f"{method}/{n}" if names.count(n) == 1 else f"{method}/{n}:{p.name}"
          for n, p in zip(names, phases)]


def _compile_key(phase: train.Phase, inputs: train.Inputs):
  # What the Trainer's compile cache tells steps apart by (bar the pool sizes, which
  # only change the tiny batch-index tables): objective, stream names, input shapes.
  leaves, treedef = jax.tree.flatten(inputs)
  return (phase.objective, tuple(sorted(phase.streams)), treedef,
          tuple((np.shape(x), jnp.result_type(x)) for x in leaves))


def _stepper(trainer: train.Trainer, phase: train.Phase, params, inputs,
             warmup: int) -> tuple[train.Stepper, dict]:
  """A phase's Stepper, compiled and warmed up (its first call, then `warmup` more)."""
  t0 = time.perf_counter()
  stepper = trainer.stepper(phase, params, inputs)
  setup_s = time.perf_counter() - t0  # compile + first call
  _time_calls(stepper, warmup, jax.block_until_ready)
  return stepper, dict(kind="step", phase=phase.name, objective=phase.objective.__name__,
                       streams={k: s.pool for k, s in sorted(phase.streams.items())},
                       compile_s=stepper.compile_seconds, setup_s=setup_s,
                       steps_per_call=stepper.steps)


def _parallel(fn: Callable, items: list, threads: int) -> list:
  """[fn(x) for x in items], `threads` at a time (XLA releases the GIL while it compiles)."""
  if threads <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(fn, items))


class _Row:
  """A row ready to time: compiled, and called once."""

  def __init__(self, call: Callable[[], Any], info: dict, steps: int = 0,
               examples_per_step: int = 0):
    self.call = call  # one timed call
    self.info = info
    self.steps = steps  # per call; 0: a call without steps (a prepare sweep, a whole run)
    self.examples_per_step = examples_per_step


def _first_call(trainer: train.Trainer, call: Callable[[], Any]) -> tuple[Any, dict]:
  """A call's first run (it compiles): its result, wall time and this thread's compile time."""
  compile_before = trainer.compile_seconds()
  t0 = time.perf_counter()
  result = jax.block_until_ready(call())
  first_call_s = time.perf_counter() - t0
  return result, dict(kind="call", compile_s=trainer.compile_seconds() - compile_before,
                      first_call_s=first_call_s)


def _prepare_method(trainer: train.Trainer, name: str, section, params):
  """A method's recipe, its inputs, and its prepare and run rows."""
  recipe = METHODS[name].recipe(section)
  rows = {}
  if recipe.prepare is None:
    inputs = trainer.prepare(recipe, params)  # empty
  else:
    prepare = lambda: trainer.prepare(recipe, params)
    inputs, info = _first_call(trainer, prepare)
    rows[f"{name}/prepare"] = _Row(prepare, info)
  if not recipe.phases:  # nothing to step through (SSD): time the whole stage
    run = lambda: trainer.run(params, recipe, jax.random.key(0), name)[0]
    rows[f"{name}/run"] = _Row(run, _first_call(trainer, run)[1])
  return recipe, inputs, rows


def time_methods(trainer: train.Trainer, names: list[str], base, params, num_calls: int,
                 threads: int, compiled_by: dict) -> dict[str, dict]:
  """Rows of the methods: prepare sweeps, one row per distinct step (or a whole run).

  Everything is compiled and called once first, `threads` rows at a time; then
  each row is timed alone, in turn. Rows whose step an earlier row compiles are
  built after the others, so that each compile is timed in the row that did it.
  """
  print(f"  jax {', '.join(names)}: prepare ...", flush=True)
  prepared = _parallel(lambda n: _prepare_method(trainer, n, base[n], params), names, threads)
  rows, waves = {}, ([], [])
  for name, (recipe, inputs, call_rows) in zip(names, prepared):
    rows.update(call_rows)
    phases = _step_kinds(recipe)
    for row, phase in zip(_row_names(name, phases), phases):
      rows[row] = None  # keeps the order: the method's rows together
      owner = compiled_by.setdefault(_compile_key(phase, inputs), row)
      waves[owner != row].append((row, phase, inputs, owner))

  def build(item):
    row, phase, inputs, owner = item
    print(f"  jax {row}: compile ...", flush=True)
    stepper, info = _stepper(trainer, phase, params, inputs, warmup=0)
    return row, _Row(stepper, dict(info, compiled_by=owner), stepper.steps,
                     stepper.examples_per_step)

  for wave in waves:
    rows.update(_parallel(build, wave, threads))
  out = {}
  for name, r in rows.items():
    print(f"  jax {name} ...", flush=True)
    times = _time_calls(r.call, num_calls, jax.block_until_ready)
    if r.steps:
      out[name] = dict(r.info, **_rates(times, r.steps, r.examples_per_step))
    else:
      out[name] = dict(r.info, ms_per_call=1e3 * statistics.median(times),
                       ms_per_call_min=1e3 * min(times), call_times_s=times)
  return out


def time_eval(trainer: train.Trainer, params, num_calls: int, warmup: int) -> dict:
  """Whole `Trainer.predict` calls over the test set; a "step" is one batch of the lax.map."""
  n = int(trainer.test[1].shape[0])
  num_batches = -(-n // trainer.eval_width)
  call = lambda: trainer.predict(params, "test")
  first_call_s = _time_calls(call, 1, jax.block_until_ready)[0]
  _time_calls(call, warmup, jax.block_until_ready)
  times = _time_calls(call, num_calls, jax.block_until_ready)
  # predict's jit is not on the Trainer's compile clock: estimate it.
  compile_s = max(first_call_s - statistics.median(times), 0.0)
  return dict(kind="step", first_call_s=first_call_s, compile_s=compile_s,
              compile_s_estimated=True, steps_per_call=num_batches,
              **_rates(times, num_batches, n / num_batches))


# ---------------------------------------------------------------- PyTorch ----

class TorchCEStep:
  """The CE train step written the straightforward PyTorch way; a call runs K steps.

  forward (transformers ViTForImageClassification) + CE + backward + SGD with the
  Original's settings, from the same uint8 images resized and normalised in the
  step. `spec` is plain JSON so the torch.compile variant can run in a subprocess
  with a timeout.
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
    # The Original's SGD (config.train), as the JAX step runs it.
    self.opt = torch.optim.SGD(net.parameters(), lr=spec["learning_rate"],
                               momentum=spec["momentum"], weight_decay=spec["weight_decay"])

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

def benchmark_config(spec: dict, batch_size: int, dtype: str, args, peak: dict) -> dict:
  """All JAX rows and the PyTorch CE step for one (model, batch size, dtype)."""
  K = args.steps_per_chunk
  num_calls = max(1, -(-args.steps // K))
  method_calls = max(1, -(-args.method_steps // K))
  vit = model_lib.ViT(**spec["vit"], dtype=getattr(jnp, dtype))
  params = model_lib.init_params(vit, jax.random.key(0), spec["channels"])
  # 20 batches of training images: the forget pool (a tenth) fills two whole batches,
  # so every timed step is a full batch of real examples.
  data = _synthetic_data(spec, num_train=max(512, 20 * batch_size), num_test=K * batch_size)
  pools = scenario.Scenario("class", (_FORGET_CLASS,), data.train_labels == _FORGET_CLASS,
                            data.test_labels == _FORGET_CLASS).pools()
  trainer = train.Trainer(vit, data, pools, batch_size=batch_size, steps_per_chunk=K,
                          eval_batch_size=batch_size, progress=False)
  base = config_lib.get_base_config()
  jax_results, compiled_by = {}, {}

  # The CE step: the Original's and PyTorch eager, called in turn, round by round,
  # so their ratio holds on a busy machine.
  torch_result = None
  if "ce_train" in args.jax_steps:
    print("  jax ce_train + pytorch eager ce_train, interleaved ...", flush=True)
    (phase,) = original.recipe(base.train).phases
    ce_step, jax_results["ce_train"] = _stepper(trainer, phase, params, None, args.warmup)
    jax_results["ce_train"].update(compiled_by=compiled_by.setdefault(
        _compile_key(phase, train.Inputs()), "ce_train"))
    calls = {"ce_train": (ce_step, jax.block_until_ready)}
    torch_spec = dict(model=spec, batch_size=batch_size, dtype=dtype, steps_per_call=K,
                      num_calls=num_calls, warmup=args.warmup, threads=args.torch_threads,
                      learning_rate=phase.optimizer.learning_rate,
                      momentum=phase.optimizer.momentum,
                      weight_decay=phase.optimizer.weight_decay)
    eager, torch_steps = {}, {}
    for attn in (args.torch_attn if args.torch else []):
      try:
        torch_steps[attn], eager[attn] = _prepare_torch(dict(torch_spec, attn=attn, compile=False))
        calls[attn] = (torch_steps[attn], torch_steps[attn].sync)
      except Exception as e:  # e.g. an attention implementation this build lacks
        eager[attn] = dict(status=f"failed: {type(e).__name__}: {str(e)[:300]}")
    times = _interleaved(calls, num_calls)
    jax_results["ce_train"].update(_rates(times.pop("ce_train"), K, ce_step.examples_per_step),
                                   interleaved_with=sorted(set(calls) - {"ce_train"}))
    for attn, t in times.items():
      eager[attn].update(_rates(t, K, batch_size), status="ok")
    del ce_step, torch_steps, calls  # free the models before the next steps
    if args.torch:
      ok = {a: r for a, r in eager.items() if r["status"] == "ok"}
      best = max(ok, key=lambda a: ok[a]["examples_per_s"]) if ok else None
      torch_result = dict(eager=eager, best_attn=best, compile=dict(status="skipped"))
      if args.torch_compile and best:
        print("  pytorch torch.compile ce_train (subprocess) ...", flush=True)
        torch_result["compile"] = _torch_compiled_in_subprocess(
            dict(torch_spec, attn=best, compile=True), args.torch_compile_timeout)

  if args.methods:
    jax_results.update(time_methods(trainer, args.methods, base, params, method_calls,
                                    args.compile_threads, compiled_by))

  if "eval" in args.jax_steps:
    print("  jax eval ...", flush=True)
    jax_results["eval"] = time_eval(trainer, params, num_calls, args.warmup)

  peak_gflops = peak[dtype]["gflops_per_s"]
  forward_flops = vit_forward_flops(spec["vit"], spec["channels"])
  for name, r in jax_results.items():
    if r["kind"] != "step":
      continue
    passes = 1 if name == "eval" else 3  # forward, or forward + backward
    r["model_flops_per_step"] = passes * forward_flops * r["examples_per_step"]
    r["gflops_per_s"] = r["model_flops_per_step"] / (r["ms_per_step"] / 1e3) / 1e9
    r["fraction_of_peak"] = r["gflops_per_s"] / peak_gflops
  out = dict(model=spec["name"], batch_size=batch_size, dtype=dtype,
             num_devices=trainer.mesh.devices.size, vit=spec["vit"],
             num_params=model_lib.num_params(params),
             input=(f"uint8 {spec['stored_size']}x{spec['stored_size']}x{spec['channels']}"
                    + (f", bilinear-resized to {spec['vit']['image_size']} in the step"
                       if spec["stored_size"] != spec["vit"]["image_size"] else ", at model size")),
             pools={k: len(v) for k, v in pools.items()}, jax=jax_results, torch=torch_result)
  if torch_result and "ce_train" in jax_results:
    jax_eps = jax_results["ce_train"]["examples_per_s"]
    best = torch_result["best_attn"]
    if best:
      out["jax_over_torch_eager"] = jax_eps / torch_result["eager"][best]["examples_per_s"]
    if torch_result["compile"].get("status") == "ok":
      out["jax_over_torch_compile"] = jax_eps / torch_result["compile"]["examples_per_s"]
  return out


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
  head = ["model", "batch", "dtype", "step", "ex/s", "ms/step", "ms/call", "GFLOP/s",
          "% of peak", "compile s", "PyTorch eager ex/s", "torch.compile ex/s", "JAX/PyTorch",
          "JAX/compile"]
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
      compile_s = ("~" if r.get("compile_s_estimated") else "") + _fmt(r["compile_s"])
      if r.get("compiled_by", step) != step:
        compile_s += f" (as {r['compiled_by']})"
      rows.append("| " + " | ".join([
          res["model"], str(res["batch_size"]), res["dtype"], step,
          _fmt(r.get("examples_per_s")), _fmt(r.get("ms_per_step")), _fmt(r.get("ms_per_call")),
          _fmt(r.get("gflops_per_s")), _fmt(r.get("fraction_of_peak"), ".1f", 100), compile_s,
          *torch_cols]) + " |")
  return "\n".join(rows)


# ------------------------------------------------------------------ main ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="ti16", help="comma-separated: ti16, digits")
  p.add_argument("--batch_sizes", default="8,64", help="comma-separated batch sizes")
  p.add_argument("--configs", default="",
                 help="comma-separated model:batch pairs, e.g. ti16:8,digits:64 "
                      "(instead of every --model x --batch_sizes)")
  p.add_argument("--depth", type=int, default=0,
                 help="transformer blocks of the model (0: the model's own)")
  p.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16 (compute)")
  p.add_argument("--steps", type=int, default=20,
                 help="measured steps of the CE step (against PyTorch) and of evaluation")
  p.add_argument("--method_steps", type=int, default=10,
                 help="measured steps of each method's step (whole calls: at least one)")
  p.add_argument("--compile_threads", type=int, default=1,
                 help="methods' rows compiled (and first called) this many at a time, then "
                      "timed one by one. More is faster, but compile seconds then include "
                      "waiting for the CPU, and a GPU's autotuning shares the device")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed calls after the first (CE step, PyTorch, evaluation)")
  p.add_argument("--steps_per_chunk", type=int, default=5, help="steps per compiled call")
  p.add_argument("--jax_steps", default=",".join(STEP_NAMES),
                 help=f"comma-separated rows besides the methods': {', '.join(STEP_NAMES)}, "
                      "or none")
  p.add_argument("--methods", default="all",
                 help=f"comma-separated methods to time ({', '.join(METHODS)}), all, or none")
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
                 help="XLA backend optimisation level 0: faster compiles, slower steps "
                      "(run as a script only: it is set before JAX starts)")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: digits with one block, batch 8, 2 steps per call, fast "
                      "compiles, 1 torch thread, no torch.compile")
  p.add_argument("--torch_worker", help=argparse.SUPPRESS)  # internal: one torch_ce_step(spec)
  args = p.parse_args(argv)
  if args.quick:  # a smoke test: its numbers mean little
    args.model, args.batch_sizes, args.depth, args.steps_per_chunk = "digits", "8", 1, 2
    args.steps, args.method_steps, args.warmup, args.matmul_size = 4, 2, 0, 256
    args.compile_threads = 2
    args.torch_compile, args.torch_attn, args.torch_threads = False, "sdpa", 1
  if args.configs:
    pairs = [c.split(":") for c in args.configs.split(",")]
    if any(len(pair) != 2 or not pair[1].isdigit() for pair in pairs):
      p.error(f"--configs: expected model:batch pairs, got {args.configs!r}")
    args.configs = [(m, int(b)) for m, b in pairs]
  else:
    args.configs = [(m, int(b)) for m in args.model.split(",") for b in args.batch_sizes.split(",")]
  args.dtypes = args.dtype.split(",")
  args.jax_steps = [] if args.jax_steps in ("", "none") else args.jax_steps.split(",")
  args.methods = (list(METHODS) if args.methods == "all" else
                  [] if args.methods in ("", "none") else args.methods.split(","))
  args.torch_attn = args.torch_attn.split(",")
  for m, _ in args.configs:
    if m not in MODELS:
      p.error(f"--model: unknown model {m!r}; allowed: {', '.join(MODELS)}")
  for d in args.dtypes:
    if d not in ("float32", "bfloat16"):
      p.error(f"--dtype: unknown dtype {d!r}; allowed: float32, bfloat16")
  for s in args.jax_steps:
    if s not in STEP_NAMES:
      p.error(f"--jax_steps: unknown step {s!r}; allowed: {', '.join(STEP_NAMES)}, none")
  for m in args.methods:
    if m not in METHODS:
      p.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}, all, none")
  if min(args.steps, args.method_steps, args.steps_per_chunk, args.compile_threads) < 1:
    p.error("--steps, --method_steps, --steps_per_chunk and --compile_threads must be >= 1")
  if args.depth < 0:
    p.error(f"--depth: must be >= 0, got {args.depth}")
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.torch_worker:
    print(json.dumps(torch_ce_step(json.loads(args.torch_worker))))
    return {}
  specs = {m: _model_spec(m, args.depth) for m, _ in args.configs}  # a bad --model fails first
  if args.omp_wait_policy:
    if "torch" in sys.modules:  # libgomp reads it once, when torch loads
      print("warning: torch is already imported; --omp_wait_policy has no effect", flush=True)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # the torch.compile subprocess inherits it
  t_start = time.perf_counter()
  info = machine_info()
  n = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
  print(f"matmul peak ({n}^3) ...", flush=True)
  peak = {d: matmul_peak(n, getattr(jnp, d), num_calls=5) for d in ("float32", "bfloat16")}
  if args.torch:
    peak["torch"] = {d: torch_matmul_peak(n, d, num_calls=5, threads=args.torch_threads)
                     for d in ("float32", "bfloat16")}
  results = []
  for m, b in args.configs:
    for dtype in args.dtypes:
      print(f"{m} batch {b} {dtype}", flush=True)
      res = benchmark_config(specs[m], b, dtype, args, peak)
      if args.gemms and dtype == "float32":
        print(f"{m} batch {b}: dense-layer GEMMs, JAX vs PyTorch", flush=True)
        res["gemms"] = gemm_comparison(specs[m]["vit"], b, num_calls=max(3, args.steps // 4),
                                       threads=args.torch_threads)
      results.append(res)
  info["load_average_1m_end"] = os.getloadavg()[0]
  out = dict(machine=info, settings={k: v for k, v in vars(args).items() if k != "torch_worker"},
             matmul_peak=peak, results=results, total_s=time.perf_counter() - t_start)
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
