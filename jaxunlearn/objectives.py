"""What a train step minimises: functions of (apply_fn, params, batch) -> (loss, metrics).

`batch` maps a stream name to {"image", "label", "mask"} arrays; `apply_fn(params,
images)` returns (logits, features). Objectives are module-level functions so the
compiled step that uses one is built once and shared by every phase that uses it.
"""
from __future__ import annotations

from jaxunlearn import losses


def cross_entropy(apply_fn, params, batch):
  b = batch["data"]
  logits_BxC, _ = apply_fn(params, b["image"])
  return losses.cross_entropy(logits_BxC, b["label"], b["mask"]), {}


def kl_uniform(apply_fn, params, batch):
  b = batch["data"]
  logits_BxC, _ = apply_fn(params, b["image"])
  return losses.kl_uniform(logits_BxC, b["mask"]), {}
