"""Throughput of the study's steps in JAX, against the same CE step in PyTorch.

  python scripts/benchmark.py --model ti16 --batch_sizes 8,64 --dtype float32
  python scripts/benchmark.py --model digits --batch_sizes 64 --methods two_stage,scrub
  python scripts/benchmark.py --configs ti16:8,digits:64 --omp_wait_policy PASSIVE
  python scripts/benchmark.py --configs ti16:64 --jax_steps eval --methods none --no-torch --gemms
  python scripts/benchmark.py --model resnet18 --batch_sizes 256      # the CIFAR ResNet-18
  python scripts/benchmark.py --model resnet18 --resnet-width 8 --resnet-stages 1,1,1,1 \\
      --batch_sizes 32 --steps 10 --method_steps 4 --no-torch_compile  # a small one, on a CPU
  python scripts/benchmark.py --quick   # 1-block digits ViT, batch 8, 2 steps per call: the test
  python scripts/benchmark.py --quick --model resnet18   # width-8, 1-1-1-1 ResNet-18, batch 8

For each (model, batch size, dtype) it measures, on JAX's default backend and only
through `train.Trainer`'s public API (bench_jax.py), so what is timed is what the
pipeline runs:
  * the CE train step: a `Trainer.stepper` of the Original's recipe
    (`methods.original.recipe(config.train)`: SGD, momentum 0.9); a call runs
    `steps_per_chunk` steps in one compiled `lax.scan`;
  * every unlearning method of `methods.METHODS` (`--methods`): its prepare sweep
    (row `<method>/prepare`) and one row per distinct step (`<method>/<objective>`),
    or whole `Trainer.run` calls for a method without phases (SSD, `<method>/run`).
    All the methods' rows are compiled and called once first (`--compile_threads`
    at a time), then each is timed alone, `--method_steps` steps (whole calls);
  * evaluation: whole `Trainer.predict` calls over the test set (a `lax.map` over batches);
  * the same CE train step written the straightforward PyTorch way (bench_torch.py):
    the ViT is transformers' `ViTForImageClassification` (sdpa and eager attention),
    the ResNet a torch.nn CIFAR ResNet (NCHW and channels_last); eager, the faster
    variant reported, called in turn with the JAX CE step, round by round, so a
    busy machine slows both alike; then under `torch.compile` (in a subprocess
    with a timeout);
  * a large jitted matmul in float32 and bfloat16: the machine's practical peak;
  * with --gemms (ViT models), each dense layer's three matmuls alone, in JAX and
    in PyTorch (bench_gemms.py).

GFLOP/s and the fraction of the matmul peak count model FLOPs (bench_models.py):
the ViT's matmuls and the ResNet's convolutions counted by hand, 3 forward passes'
worth per trained image and 1 per evaluated one. Prepare sweeps and SSD's run have
no such count, and no steps: they report ms per call only.

Compile seconds: a stepper's `compile_seconds`, a prepare or run row's change of
`Trainer.compile_seconds()` over its first call (with --compile_threads > 1 they
include waiting for the CPU). A step whose chunk an earlier row compiled (the same
key in the Trainer's compile cache, `bench_jax.chunk_key`; e.g. fine-tuning's CE step
is the Original's) reuses that compile and says so (`compiled_by`). Evaluation's
jit is not on the Trainer's clock: its compile time is its first call minus its
median call.

Images are synthetic uint8 at their stored size, resized and normalised inside
the step, as in the study: ti16 stores 32x32x3 (CIFAR-10) and resizes to 224,
digits stores 8x8x1 at model resolution, the ResNets take 32x32x3 unresized.
Class 0 is forgotten (a tenth of the training set, two full batches or more).
Calls are timed after `jax.block_until_ready`; rows report the median call (and
the minimum). Writes `--out` (JSON) and prints a Markdown table (bench_report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

_REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))  # runs from a checkout without `pip install -e .` as well



def _fast_compile(argv: list[str]) -> bool:
  """Whether to compile at XLA's optimisation level 0 (--fast_compile; --quick on a ViT).

  Level 0 halves a ViT smoke test's CPU compile time (its steps then run ~2x
  slower), but makes the Trainer's ResNet train step ~25x slower on the CPU
  (1.2 s instead of 47 ms at width 8, batch 8): a ResNet's --quick run would spend
  more time stepping than it saves compiling.
  """
  pre = argparse.ArgumentParser(add_help=False)
  for flag in ("--quick", "--fast_compile"):
    pre.add_argument(flag, action="store_true")
  pre.add_argument("--model", default="")
  pre.add_argument("--configs", default="")
  a, _ = pre.parse_known_args(argv)
  return a.fast_compile or (a.quick and "resnet" not in a.model + a.configs)


if __name__ == "__main__" and _fast_compile(sys.argv[1:]):
  # The Trainer compiles with XLA's defaults, so the optimisation level can only come
  # from XLA_FLAGS, which XLA reads once, when JAX starts: here, before jax loads.
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax

from jaxunlearn import config as config_lib, models, scenario, train
from jaxunlearn.methods import METHODS, original

import bench_jax
import bench_models
import bench_report
import bench_timing as timing

# Rows besides the methods' (--jax_steps).
STEP_NAMES = ("ce_train", "eval")


def _torch_ce_train(spec: dict, phase: train.Phase, ce_step, batch_size: int, dtype: str,
                    args, num_calls: int) -> tuple[dict, dict | None]:
  """The JAX CE step's call times, interleaved with PyTorch eager's; then torch.compile's."""
  K = args.steps_per_chunk
  calls = {"ce_train": (ce_step, jax.block_until_ready)}
  eager, torch_steps, torch_spec = {}, {}, None
  if args.torch:
    import bench_torch  # here, not above: OMP_WAIT_POLICY must be set before torch loads
    torch_spec = dict(model=spec, batch_size=batch_size, dtype=dtype, steps_per_call=K,
                      num_calls=num_calls, warmup=args.warmup, threads=args.torch_threads,
                      compile=False, learning_rate=phase.optimizer.learning_rate,
                      momentum=phase.optimizer.momentum,
                      weight_decay=phase.optimizer.weight_decay)
    variants = args.torch_attn if spec["arch"] == "vit" else args.torch_layout
    for v in variants:
      try:
        torch_steps[v], eager[v] = bench_torch.prepare(dict(torch_spec, variant=v))
        calls[v] = (torch_steps[v], torch_steps[v].sync)
      except Exception as e:  # e.g. an attention implementation this build lacks
        eager[v] = dict(status=f"failed: {type(e).__name__}: {str(e)[:300]}")
  times = timing.interleaved(calls, num_calls)
  jax_row = dict(timing.rates(times.pop("ce_train"), K, ce_step.examples_per_step),
                 interleaved_with=sorted(set(calls) - {"ce_train"}))
  for v, t in times.items():
    eager[v].update(timing.rates(t, K, batch_size), status="ok")
  del torch_steps, calls  # free the models before the next steps
  if not args.torch:
    return jax_row, None
  ok = {v: r for v, r in eager.items() if r["status"] == "ok"}
  best = max(ok, key=lambda v: ok[v]["examples_per_s"]) if ok else None
  result = dict(eager=eager, best_variant=best, compile=dict(status="skipped"))
  if args.torch_compile and best:
    print("  pytorch torch.compile ce_train (subprocess) ...", flush=True)
    result["compile"] = bench_torch.compiled_in_subprocess(
        dict(torch_spec, variant=best, compile=True), args.torch_compile_timeout)
  return jax_row, result


def benchmark_config(name: str, batch_size: int, dtype: str, args, peak: dict) -> dict:
  """All JAX rows and the PyTorch CE step for one (model, batch size, dtype)."""
  K = args.steps_per_chunk
  num_calls = max(1, -(-args.steps // K))
  method_calls = max(1, -(-args.method_steps // K))
  sizes = dict(depth=args.depth, resnet_width=args.resnet_width, resnet_stages=args.resnet_stages)
  spec = bench_models.spec(name, **sizes)
  model, variables = bench_models.build(name, jax.random.key(0), dtype=dtype, **sizes)
  # 20 batches of training images: the forget pool (a tenth) fills two whole batches,
  # so every timed step is a full batch of real examples.
  data = bench_models.synthetic_data(spec, num_train=max(512, 20 * batch_size),
                                     num_test=K * batch_size)
  forget = bench_models.FORGET_CLASS
  pools = scenario.Scenario("class", (forget,), data.train_labels == forget,
                            data.test_labels == forget, sweep_classes=data.train_labels).pools()
  trainer = train.Trainer(model, data, pools, batch_size=batch_size, steps_per_chunk=K,
                          eval_batch_size=batch_size, progress=False)
  base = config_lib.get_base_config()
  jax_results, compiled_by, torch_result = {}, {}, None

  if "ce_train" in args.jax_steps:
    print("  jax ce_train + pytorch eager ce_train, interleaved ...", flush=True)
    (phase,) = original.recipe(base.train).phases
    ce_step, info = bench_jax.stepper(trainer, phase, variables, None, args.warmup)
    info["compiled_by"] = compiled_by.setdefault(
        bench_jax.chunk_key(trainer, phase, train.Inputs()), "ce_train")
    rates, torch_result = _torch_ce_train(spec, phase, ce_step, batch_size, dtype, args, num_calls)
    jax_results["ce_train"] = dict(info, **rates)
    del ce_step

  if args.methods:
    jax_results.update(bench_jax.time_methods(trainer, args.methods, base, variables,
                                              method_calls, args.compile_threads, compiled_by))

  if "eval" in args.jax_steps:
    print("  jax eval ...", flush=True)
    jax_results["eval"] = bench_jax.time_eval(trainer, variables, num_calls, args.warmup)

  forward_flops = bench_models.forward_flops(spec)
  for row, r in jax_results.items():
    if r["kind"] != "step":
      continue
    passes = 1 if row == "eval" else 3  # forward, or forward + backward
    r["model_flops_per_step"] = passes * forward_flops * r["examples_per_step"]
    r["gflops_per_s"] = r["model_flops_per_step"] / (r["ms_per_step"] / 1e3) / 1e9
    r["fraction_of_peak"] = r["gflops_per_s"] / peak[dtype]["gflops_per_s"]
  out = dict(model=name, arch=spec["arch"], batch_size=batch_size, dtype=dtype,
             num_devices=trainer.mesh.devices.size, num_params=models.num_params(variables["params"]),
             forward_flops_per_example=forward_flops, input=bench_models.describe_input(spec),
             pools={k: len(v) for k, v in pools.items()}, jax=jax_results, torch=torch_result)
  out[spec["arch"]] = spec[spec["arch"]]  # the sizes: "vit" or "resnet"
  if torch_result and "ce_train" in jax_results:
    jax_eps = jax_results["ce_train"]["examples_per_s"]
    best = torch_result["best_variant"]
    if best:
      out["jax_over_torch_eager"] = jax_eps / torch_result["eager"][best]["examples_per_s"]
    if torch_result["compile"].get("status") == "ok":
      out["jax_over_torch_compile"] = jax_eps / torch_result["compile"]["examples_per_s"]
  return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default=None,
                 help=f"comma-separated: {', '.join(bench_models.MODELS)} "
                      "(default ti16; digits with --quick)")
  p.add_argument("--batch_sizes", default="8,64", help="comma-separated batch sizes")
  p.add_argument("--configs", default="",
                 help="comma-separated model:batch pairs, e.g. ti16:8,digits:64,resnet18:64 "
                      "(instead of every --model x --batch_sizes)")
  p.add_argument("--depth", type=int, default=0,
                 help="ViT: transformer blocks of the model (0: the model's own)")
  p.add_argument("--resnet_width", "--resnet-width", type=int, default=0,
                 help="ResNet: channels of the first stage (0: 64, as the references; "
                      "--quick: 8)")
  p.add_argument("--resnet_stages", "--resnet-stages", default=None,
                 help='ResNet: blocks per stage, e.g. "1,1,1,1" ("": the name\'s, '
                      "resnet18: 2,2,2,2; --quick: 1,1,1,1)")
  p.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16 (compute)")
  p.add_argument("--steps", type=int, default=20,
                 help="measured steps of the CE step (against PyTorch) and of evaluation")
  p.add_argument("--method_steps", type=int, default=10,
                 help="measured steps of each method's step (whole calls: at least one)")
  p.add_argument("--compile_threads", type=int, default=1,
                 help="methods' rows compiled (and first called) this many at a time, then "
                      "timed one by one (one device only: several devices' collectives "
                      "could wait on each other). More is faster, but compile seconds then "
                      "include waiting for the CPU, and a GPU's autotuning shares the device")
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
                 help="ViT: transformers attention implementations to try; the faster is reported")
  p.add_argument("--torch_layout", default="nchw,channels_last",
                 help="ResNet: PyTorch memory layouts to try; the faster is reported")
  p.add_argument("--torch_threads", type=int, default=os.cpu_count(),
                 help="torch.set_num_threads (default: all CPUs)")
  p.add_argument("--omp_wait_policy", choices=("PASSIVE", "ACTIVE"), default=None,
                 help="OMP_WAIT_POLICY for PyTorch's CPU threads (default: as in the environment). "
                      "PASSIVE keeps eager PyTorch usable when another process holds a core")
  p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--torch_compile_timeout", type=float, default=900.0, help="seconds")
  p.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU/TPU")
  p.add_argument("--gemms", action="store_true",
                 help="also time each dense layer's three matmuls alone, JAX vs PyTorch "
                      "(fp32, ViT models)")
  p.add_argument("--out", default="benchmark.json")
  p.add_argument("--fast_compile", action="store_true",
                 help="XLA backend optimisation level 0: faster compiles, slower steps "
                      "(run as a script only: it is set before JAX starts)")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: digits with one block (or --model's ResNet at width 8, "
                      "1-1-1-1), batch 8, 2 steps per call, fast compiles, 1 torch thread, "
                      "one torch variant, no torch.compile")
  args = p.parse_args(argv)
  if args.quick:  # a smoke test: its numbers mean little
    args.model = args.model or "digits"
    args.batch_sizes, args.depth, args.steps_per_chunk = "8", 1, 2
    args.resnet_width = args.resnet_width or 8
    args.resnet_stages = "1,1,1,1" if args.resnet_stages is None else args.resnet_stages
    args.steps, args.method_steps, args.warmup, args.matmul_size = 4, 2, 0, 256
    args.compile_threads = 2
    args.torch_compile, args.torch_threads = False, 1
    args.torch_attn, args.torch_layout = "sdpa", "nchw"
  args.model = args.model or "ti16"
  args.resnet_stages = args.resnet_stages or ""
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
  args.torch_attn, args.torch_layout = args.torch_attn.split(","), args.torch_layout.split(",")
  for m, _ in args.configs:
    if m not in bench_models.MODELS:
      p.error(f"--model: unknown model {m!r}; allowed: {', '.join(bench_models.MODELS)}")
  for d in args.dtypes:
    if d not in models.DTYPES:
      p.error(f"--dtype: unknown dtype {d!r}; allowed: {', '.join(models.DTYPES)}")
  for s in args.jax_steps:
    if s not in STEP_NAMES:
      p.error(f"--jax_steps: unknown step {s!r}; allowed: {', '.join(STEP_NAMES)}, none")
  for m in args.methods:
    if m not in METHODS:
      p.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}, all, none")
  if min(args.steps, args.method_steps, args.steps_per_chunk, args.compile_threads) < 1:
    p.error("--steps, --method_steps, --steps_per_chunk and --compile_threads must be >= 1")
  if args.depth < 0 or args.resnet_width < 0:
    p.error("--depth and --resnet_width must be >= 0")
  try:  # the package's own check of the ResNet sizes, before any work
    config = bench_models.config("resnet18", resnet_width=args.resnet_width,
                                 resnet_stages=args.resnet_stages)
    models.validate(config, bench_models.NUM_CLASSES)
  except ValueError as e:
    p.error(str(e))
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.omp_wait_policy:
    if "torch" in sys.modules:  # libgomp reads it once, when torch loads
      print("warning: torch is already imported; --omp_wait_policy has no effect", flush=True)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # the torch.compile subprocess inherits it
  t_start = time.perf_counter()
  info = bench_report.machine_info()
  n = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
  print(f"matmul peak ({n}^3) ...", flush=True)
  peak = {d: bench_jax.matmul_peak(n, d, num_calls=5) for d in ("float32", "bfloat16")}
  if args.torch:
    import bench_torch
    peak["torch"] = {d: bench_torch.matmul_peak(n, d, num_calls=5, threads=args.torch_threads)
                     for d in ("float32", "bfloat16")}
  results = []
  for m, b in args.configs:
    for dtype in args.dtypes:
      print(f"{m} batch {b} {dtype}", flush=True)
      res = benchmark_config(m, b, dtype, args, peak)
      if args.gemms and dtype == "float32" and res["arch"] == "vit":
        import bench_gemms
        print(f"{m} batch {b}: dense-layer GEMMs, JAX vs PyTorch", flush=True)
        res["gemms"] = bench_gemms.gemm_comparison(res["vit"], b, num_calls=max(3, args.steps // 4),
                                                   threads=args.torch_threads)
      results.append(res)
  info["load_average_1m_end"] = os.getloadavg()[0]
  out = dict(machine=info, settings=vars(args), matmul_peak=peak, results=results,
             total_s=time.perf_counter() - t_start)
  out["table"] = bench_report.markdown_table(results)
  if args.gemms:
    out["gemm_table"] = bench_report.gemm_table(results)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\npeak matmul GFLOP/s: float32 {peak['float32']['gflops_per_s']:.0f}, "
        f"bfloat16 {peak['bfloat16']['gflops_per_s']:.0f} (JAX, {n}^3)")
  print(out["table"])
  if args.gemms:
    print("\n" + out["gemm_table"])
  print(f"\nwrote {args.out} ({out['total_s']:.0f} s)")
  return out


if __name__ == "__main__":
  main()
