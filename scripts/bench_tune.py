"""Trials per minute of a tuning search on digits, the overhead per trial, and PyTorch's loop.

  python scripts/bench_tune.py --method finetune --trials 12 [--torch] [--out tune.json]

JAX: `tune.Search` on `configs/digits_tune.py` (the tuning seed's Original and Gold
trained first, not timed), then `--trials` Optuna trials of one method, as a tuning
run makes them. A trial's time splits into the method's run, its evaluation
(predictions on training and validation data, every metric), compiling (its first
trial only) and the rest: the overhead (Optuna, planning batches, host work), the
figure the issue asks to keep under 10%.

PyTorch (`--torch`, fine-tuning only): the same trials (the same epochs and
learning rates) in eager PyTorch on the same ViT (bench_torch.CEStep: forward, CE,
backward, SGD per batch over the retain set's size) plus an eval-mode forward over
the training and validation images: the loop a PyTorch search would run per trial,
without its metrics. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--method", default="finetune")
  p.add_argument("--trials", type=int, default=12)
  p.add_argument("--config", default=os.path.join(_REPO, "configs", "digits_tune.py"))
  p.add_argument("--train_epochs", type=int, default=0, help="Original/Gold epochs (0: config's)")
  p.add_argument("--torch", action="store_true", help="time the same trials in eager PyTorch")
  p.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--out", default="", help="also write the JSON here")
  return p.parse_args(argv)


def jax_trials(args) -> dict:
  from jaxunlearn import config as config_lib, tune, tuning_report
  c = config_lib.from_file(args.config)
  c.tune.methods, c.tune.trials, c.progress = args.method, args.trials, False
  if args.train_epochs:
    c.train.epochs = args.train_epochs
  config_lib.validate(c)
  with tempfile.TemporaryDirectory() as workdir:
    s = tune.Search(c)
    s.train(workdir)
    t0 = time.perf_counter()
    study = tune.tune_method(s, c, workdir, args.method, 0, tune.identity(c, s, args.method))
    wall = time.perf_counter() - t0
  row = tuning_report.summarize({args.method: study}, c)[args.method]
  row["search_seconds"] = wall
  row["retain_examples"] = int(s.scene.pools()["retain"].shape[0])
  row["eval_examples"] = int(s.trainer.train[1].shape[0] + s.trainer.test[1].shape[0])
  return row


def torch_trials(args, jax_row: dict) -> dict:
  import bench_models
  import bench_torch
  import torch
  from jaxunlearn import config as config_lib
  c = config_lib.from_file(args.config)
  spec = bench_models.spec("digits")
  B = c.batch_size
  steps_per_epoch = -(-jax_row["retain_examples"] // B)
  times = []
  for t in jax_row["all_trials"]:
    v = t["values"]
    t0 = time.perf_counter()
    step = bench_torch.CEStep(dict(
        model=spec, variant="sdpa", batch_size=B, dtype="float32", threads=args.torch_threads,
        compile=False, steps_per_call=int(v["epochs"]) * steps_per_epoch,
        learning_rate=v["learning_rate"], momentum=c.finetune.momentum,
        weight_decay=c.finetune.weight_decay))
    step()
    with torch.no_grad():  # the evaluation's forward passes, eval batch size
      n = jax_row["eval_examples"]
      x = step.images_u8_NxCxHxW[:1].expand(c.eval.batch_size, -1, -1, -1)
      for _ in range(-(-n // c.eval.batch_size)):
        step.loss_fn(x, step.labels_N[:1].expand(c.eval.batch_size))
    times.append(time.perf_counter() - t0)
  return dict(seconds=sum(times), trials=len(times),
              trials_per_minute=60 * len(times) / sum(times), torch_version=torch.__version__,
              threads=args.torch_threads)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.torch and args.method != "finetune":
    raise SystemExit("--torch: only --method finetune has a PyTorch loop here")
  row = jax_trials(args)
  out = {"method": args.method,
         "jax": {k: v for k, v in row.items() if k not in ("all_trials", "metrics")}}
  if args.torch:
    out["torch_eager"] = torch_trials(args, row)
    out["speedup"] = out["jax"]["trials_per_minute"] / out["torch_eager"]["trials_per_minute"]
  text = json.dumps(out, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return out


if __name__ == "__main__":
  main()
