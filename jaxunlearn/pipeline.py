"""The study end to end: train Original and Gold, unlearn, evaluate, report.

`train_and_evaluate(config, workdir)` is the one function `main.py` calls; it can
equally be driven from a notebook. Each stage is checkpointed in the workdir and
reused when the same command runs again.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunlearn import checkpoints, config as config_lib, datasets, evaluate, methods
from jaxunlearn import model as model_lib, objectives, report, train

# Fields that change how fast a run goes or what it shows, not what it computes.
_NON_RESULT_FIELDS = ("progress", "steps_per_chunk", "eval.batch_size", "concurrent_stages")

DISPLAY_NAMES = {"original": "Original", "gold": "Gold Standard"}


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Checks the workdir is writable and holds no run of a different config; records this one."""
  config_dict = json.loads(config.to_json())
  try:
    os.makedirs(workdir, exist_ok=True)
    report.atomic_write(os.path.join(workdir, ".write_test"), "")
    os.remove(os.path.join(workdir, ".write_test"))
  except OSError as e:
    raise ValueError(f"--workdir: cannot write to {workdir!r} ({e.strerror}); "
                     "choose a writable folder") from None
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = _flat(json.load(f))
    new = _flat(config_dict)
    diff = sorted(k for k in old.keys() | new.keys()
                  if k not in _NON_RESULT_FIELDS and old.get(k) != new.get(k))
    if diff:
      k = diff[0]
      raise ValueError(f"--workdir {workdir!r} holds a run with a different config "
                       f"({', '.join(diff)}; e.g. {k}: {old.get(k)!r} there, {new.get(k)!r} now); "
                       "use a new --workdir to keep both")
  elif jax.process_index() == 0:  # multi-host: one writer
    report.atomic_write(path, json.dumps(config_dict, indent=2))
  return config_dict


def build_model(config, data: datasets.Dataset, rng):
  """The ViT and its initial parameters: pretrained (head re-initialised) or random."""
  dtype = config_lib.DTYPES[config.model.dtype]
  if not config.model.init:
    vit = model_lib.create(config.model, data.num_classes, dtype)
    return vit, model_lib.init_params(vit, rng, data.train_images.shape[-1])
  from jaxunlearn import weights
  kwargs, params = weights.load_pretrained(config.model.init, num_classes=data.num_classes,
                                           rng=rng, image_size=config.model.image_size)
  if config.model.variant:
    want = model_lib.VARIANTS[config.model.variant]
    got = {k: kwargs[k] for k in want}
    if got != want:
      raise ValueError(f"config.model.variant: {config.model.variant} is {want}, but "
                       f"{config.model.init} holds {got}; set variant to \"\" or match the weights")
  channels = params["patch_embed"]["kernel"].shape[2]
  if channels != data.train_images.shape[-1]:
    raise ValueError(f"config.model.init: the weights take {channels}-channel images, "
                     f"{config.data.name} has {data.train_images.shape[-1]}")
  return model_lib.ViT(**kwargs, dtype=dtype), params


def _stage(trainer, workdir, abstract, name, params, phases, rng, learning_rate, bar_position=0):
  """Runs (or restores) one training/unlearning stage; returns (params, seconds)."""
  path = os.path.join(workdir, "checkpoints", name)
  restored = checkpoints.restore(path, abstract)
  if restored is not None:
    logging.info("%s: restored from %s", name, workdir)
    return restored[0], restored[1]["seconds"]
  t0 = time.perf_counter()
  params, log = trainer.run(params, phases, rng, desc=name, learning_rate=learning_rate,
                            bar_position=bar_position)
  params = jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  checkpoints.save(path, len(log["loss"]), arrays=params,
                   record={"seconds": seconds, "loss": log["loss"]})
  return params, seconds


def _concurrent(config) -> bool:
  # One process on the CPU only: on accelerators a stage already fills the device,
  # and collectives of concurrent programs could interleave differently across hosts.
  return (config.concurrent_stages and jax.default_backend() == "cpu"
          and jax.process_count() == 1)


def _stages(trainer, workdir, jobs, abstract, parallel: bool) -> dict:
  """{name: (params, seconds)} of independent stages `jobs` = [(name, params, phases, rng, lr)]."""
  if not parallel or len(jobs) < 2:
    return {job[0]: _stage(trainer, workdir, abstract, *job) for job in jobs}
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    futures = {job[0]: pool.submit(_stage, trainer, workdir, abstract, *job, bar_position=i)
               for i, job in enumerate(jobs)}
    try:
      done, _ = concurrent.futures.wait(futures.values(),
                                        return_when=concurrent.futures.FIRST_EXCEPTION)
      for f in done:
        f.result()  # re-raises the first failure while the others still run
      return {name: f.result() for name, f in futures.items()}
    except BaseException:  # a failed stage or Ctrl-C: stop the others at their next chunk
      trainer.cancel.set()
      raise


def _evaluate(trainer, workdir, name, params, data, forget_class, gold_test_probs, tsne_idx):
  """Metrics of one model (checkpointed in workdir/eval), its test probabilities and t-SNE features."""
  path = os.path.join(workdir, "eval", name)
  restored = checkpoints.restore(path, arrays_name="outputs")
  if restored is not None:
    outputs, summary = restored
    feats = outputs.get("tsne_features")
    return summary, np.asarray(outputs["test_probs"]), None if feats is None else np.asarray(feats)
  train_probs, train_feats = trainer.predict(params, "train")
  test_probs, _ = trainer.predict(params, "test")
  gold = test_probs if gold_test_probs is None else gold_test_probs
  summary = evaluate.summarize(train_probs, trainer.train[1], test_probs, trainer.test[1],
                               gold, forget_class=forget_class)
  summary = {k: float(v) for k, v in jax.device_get(summary).items()}
  outputs = {"test_probs": np.asarray(test_probs)}
  if len(tsne_idx):  # orbax cannot save an empty array
    outputs["tsne_features"] = np.asarray(train_feats)[tsne_idx]
  checkpoints.save(path, 0, arrays=outputs, record=summary, arrays_name="outputs")
  return summary, outputs["test_probs"], outputs.get("tsne_features")


def _tsne_embeddings(workdir, features: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """2-D t-SNE of each model's features (checkpointed in workdir/tsne).

  scikit-learn's t-SNE runs on one core, so the models run in parallel processes.
  """
  path = os.path.join(workdir, "tsne")
  restored = checkpoints.restore(path, arrays_name="embeddings")
  if restored is not None:
    return {m: np.asarray(restored[0][m]) for m in features}
  import joblib
  t0 = time.perf_counter()
  jobs = (joblib.delayed(report.tsne)(f, config.tsne.perplexity, config.seed) for f in features.values())
  xy = joblib.Parallel(n_jobs=min(len(features), os.cpu_count() or 1))(jobs)
  embeddings = dict(zip(features, xy))
  checkpoints.save(path, 0, arrays=embeddings, record={"seconds": time.perf_counter() - t0},
                   arrays_name="embeddings")
  return embeddings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the whole study; returns the results dict also written to results.json."""
  config_lib.validate(config)
  if config.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  config_dict = prepare_workdir(config, workdir)
  data = datasets.load(config.data)
  fc = config.forget_class
  key = jax.random.key(config.seed)
  vit, init_params = build_model(config, data, jax.random.fold_in(key, 0))
  trainer = train.Trainer(
      vit, data, fc, batch_size=config.batch_size,
      momentum=config.optimizer.momentum, steps_per_chunk=config.steps_per_chunk,
      eval_batch_size=config.eval.batch_size, progress=config.progress)
  logging.info("%s: %d train (%d forget) / %d test examples; ViT with %s parameters; %d device(s)",
               config.data.name, len(data.train_labels), int(np.sum(data.train_labels == fc)),
               len(data.test_labels), f"{model_lib.num_params(init_params):,}", jax.device_count())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.replicated), init_params)

  def supervised(pool):
    return [train.Phase("train", objectives.cross_entropy,
                        {"data": train.Stream(pool, epochs=config.train_epochs)})]

  parallel = _concurrent(config)
  train_lr, unlearn_lr = config.optimizer.learning_rate, config.optimizer.unlearn_learning_rate
  done = _stages(trainer, workdir, [
      ("original", init_params, supervised("all"), jax.random.fold_in(key, 1), train_lr),
      ("gold", init_params, supervised("retain"), jax.random.fold_in(key, 2), train_lr),
  ], abstract, parallel)
  method_names = (config.methods,) if isinstance(config.methods, str) else tuple(config.methods)
  done.update(_stages(trainer, workdir, [
      (name, done["original"][0], methods.METHODS[name].phases(config),
       jax.random.fold_in(key, 100 + i), unlearn_lr)
      for i, name in enumerate(method_names)], abstract, parallel))
  params = {name: p for name, (p, _) in done.items()}
  seconds = {name: t for name, (_, t) in done.items()}

  names = dict(DISPLAY_NAMES, **{m: methods.METHODS[m].DISPLAY_NAME for m in method_names})
  tsne_idx = evaluate.tsne_indices(
      data.train_labels, fc, batch_size=config.batch_size, num_retain=config.tsne.num_retain,
      num_forget=config.tsne.num_forget, seed=config.seed)
  results, feats = {}, {}
  order = ["gold", "original", *method_names]  # gold first: the others are compared with it
  gold_probs = None
  for name in order:
    results[name], test_probs, feats[name] = _evaluate(
        trainer, workdir, name, params[name], data, fc, gold_probs, tsne_idx)
    results[name]["seconds"] = seconds[name]
    if name == "gold":
      gold_probs = test_probs
  results = {m: results[m] for m in ["original", "gold", *method_names]}

  png = None
  if len(tsne_idx):
    is_forget = data.train_labels[tsne_idx] == fc
    embeddings = _tsne_embeddings(workdir, {m: feats[m] for m in results}, config)
    png = report.tsne_figure(embeddings, is_forget, names)
  if jax.process_index() == 0:
    print(report.write(workdir, config_dict, results, names, png))
  return {"config": config_dict, "models": results}
