"""Pretrained ViT weights from safetensors (timm or transformers layout) as `model.ViT` params.

A source is a local `.safetensors` file (a `config.json` beside it is read too), a local
folder holding `model.safetensors` (+ optional `config.json`), or a Hugging Face hub id
`org/name`, fetched with `huggingface_hub.hf_hub_download` (its cache, `HF_HUB_OFFLINE`).
Pickle checkpoints are refused: loading one runs arbitrary code.

The architecture comes from the tensors themselves (hidden size, depth, patch and MLP size,
image size via the position-embedding grid); only what shapes cannot tell is read from
`config.json` (number of heads, LayerNorm eps, activation) or passed explicitly.

The source's classifier is dropped and a fresh head with the requested number of classes is
initialised exactly as `model.ViT` does. Everything else is checked for full coverage: every
source tensor is used (bar the head and `IGNORED_KEYS`), every model parameter filled, every
shape matched; anything else is an error naming the keys, never a silent partial load.
"""
from __future__ import annotations

import functools
import json
import math
import operator
import os
import re
from typing import Any, Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxunlearn.models import vit as model_lib

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

# Source classifiers: replaced by a fresh head with the requested classes, never imported.
HEAD_KEYS = {
    "timm": ("head.weight", "head.bias"),
    "transformers": ("classifier.weight", "classifier.bias"),
}
# Source tensors deliberately left out (transformers names are under the `vit.` prefix, which
# a saved ViTModel lacks). transformers' ViTModel pooler (dense + tanh on the class token)
# only feeds its `pooler_output`; our features are the class token after the final
# LayerNorm, before any pooler.
IGNORED_KEYS = {
    "timm": (),
    "transformers": ("pooler.dense.weight", "pooler.dense.bias"),
}
# timm names its ViT sizes; the head count is not recoverable from shapes (vit_huge has
# 16 heads of 80, not 20 of 64), so it is read from the architecture name.
TIMM_NUM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}
TIMM_LAYER_NORM_EPS = 1e-6
# transformers' ViTConfig defaults, used only where a config.json omits the field.
HF_DEFAULT_LAYER_NORM_EPS = 1e-12
HF_DEFAULT_HIDDEN_ACT = "gelu"

_MAX_NAMED = 5  # keys named per kind in an error message
_USE_LOCAL = (f"download them where the hub is reachable, or set config.model.init to a local "
              f"folder holding {WEIGHTS_FILE} and {CONFIG_FILE}")


def _pickle_error(path: str) -> ValueError:
  return ValueError(
      f"{path}: pickle checkpoints are not loaded (unpickling runs arbitrary code); convert it "
      f"once to safetensors, e.g. safetensors.torch.save_file(torch.load(path, "
      f"weights_only=True), 'model.safetensors'), and set config.model.init to that file")


# --------------------------------------------------------------------------- reading sources


def _is_hub_id(source: str) -> bool:
  return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None


def _hub_files(repo_id: str) -> tuple[str, str | None]:
  """Local paths of the hub repo's weights and config.json (None when the repo has none)."""
  from huggingface_hub import hf_hub_download
  from huggingface_hub import errors as hub_errors
  try:
    weights = hf_hub_download(repo_id, WEIGHTS_FILE)
  except hub_errors.LocalEntryNotFoundError as e:  # offline, or hub unreachable, and not cached
    raise OSError(
        f"{repo_id}: not a local path, and the weights could not be fetched from the Hugging "
        f"Face hub nor found in its cache ({type(e).__name__}); {_USE_LOCAL}") from e
  except hub_errors.EntryNotFoundError as e:  # the repo exists but has no safetensors
    raise ValueError(
        f"{repo_id}: the repo has no {WEIGHTS_FILE} (pickle-only repos are not loaded); "
        f"convert its checkpoint to safetensors and set config.model.init to that folder") from e
  except OSError as e:  # unknown/gated repo, HTTP errors (HfHubHTTPError is an OSError)
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise OSError(f"{repo_id}: not a local path, and the weights could not be fetched from the "
                  f"Hugging Face hub ({reason}); {_USE_LOCAL}") from e
  try:
    config = hf_hub_download(repo_id, CONFIG_FILE)
  except OSError:  # no config.json (or not cached): the loader asks for what it then lacks
    config = None
  return weights, config


def _resolve(source: str) -> tuple[str, str | None]:
  """Local paths of the safetensors file and its config.json (None when absent)."""
  path = os.path.expanduser(os.fspath(source))
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise _pickle_error(path)
  if os.path.isdir(path):
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
      pickles = sorted(f for f in os.listdir(path) if f.lower().endswith(PICKLE_SUFFIXES))
      if pickles:
        raise _pickle_error(os.path.join(path, pickles[0]))
      if os.path.isfile(weights + ".index.json"):
        raise ValueError(f"{path}: sharded checkpoints ({WEIGHTS_FILE}.index.json) are not "
                         f"supported; merge the shards into one {WEIGHTS_FILE}")
      raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} in this folder")
  elif os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path}: expected a .safetensors file, a folder holding "
                       f"{WEIGHTS_FILE}, or a hub id org/name")
    weights = path
  elif _is_hub_id(path):
    return _hub_files(path)
  else:
    raise FileNotFoundError(f"{path}: no such file or folder (and not a hub id org/name)")
  config = os.path.join(os.path.dirname(weights), CONFIG_FILE)
  return weights, config if os.path.isfile(config) else None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except TypeError:
    # numpy has no bfloat16: read through JAX on the host (ml_dtypes bfloat16 arrays).
    with jax.default_device(jax.devices("cpu")[0]), \
        safetensors.safe_open(path, framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_source(source: str) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors by name, config.json as a dict or {}) of a file, folder or hub id."""
  weights, config = _resolve(source)
  tensors = _load_safetensors(weights)
  if config is None:
    return tensors, {}
  with open(config) as f:
    return tensors, json.load(f)


# --------------------------------------------------------------------------- architecture


def _required(tensors: dict, key: str, layout: str) -> np.ndarray:
  if key not in tensors:
    raise ValueError(f"{layout} checkpoint lacks {key!r}, needed to infer the architecture")
  return tensors[key]


def _depth(tensors: dict, block_pattern: str, layout: str) -> int:
  """Number of blocks = highest block index + 1 (gaps show up as missing keys later)."""
  indices = [int(m.group(1)) for k in tensors if (m := re.match(block_pattern, k))]
  if not indices:
    raise ValueError(f"{layout} checkpoint has no transformer blocks ({block_pattern})")
  return max(indices) + 1


def _grid(pos_1xLxD: np.ndarray, key: str) -> int:
  """Side of the patch grid of a (1, 1 + g*g, D) position embedding."""
  tokens = pos_1xLxD.shape[1] - 1
  g = math.isqrt(max(tokens, 0))
  if pos_1xLxD.ndim != 3 or g * g != tokens:
    raise ValueError(f"{key} has shape {pos_1xLxD.shape}, not (1, 1 + g*g, D): only a class "
                     f"token plus a square patch grid is supported")
  return g


def _patch_size(kernel_DxCxPxP: np.ndarray, key: str) -> int:
  if kernel_DxCxPxP.ndim != 4 or kernel_DxCxPxP.shape[2] != kernel_DxCxPxP.shape[3]:
    raise ValueError(f"{key} has shape {kernel_DxCxPxP.shape}, not (D, C, P, P)")
  return kernel_DxCxPxP.shape[2]


def _timm_arch(tensors: dict, config: dict, num_heads: int | None, p: str) -> dict[str, Any]:
  del p  # timm keys have no prefix
  pool = config.get("global_pool", "token")
  if pool != "token":  # features must be the class token, as in model.ViT
    raise ValueError(f"timm config global_pool={pool!r}: only class-token ViTs ('token') load")
  if num_heads is None:
    num_heads = (config.get("model_args") or {}).get("num_heads")
  if num_heads is None:
    m = re.match(r"vit_([a-z]+)_patch", config.get("architecture", ""))
    num_heads = TIMM_NUM_HEADS.get(m.group(1)) if m else None
  if num_heads is None:
    raise ValueError(
        f"timm checkpoint: cannot tell the number of heads (config.json architecture "
        f"{config.get('architecture')!r} is not vit_{{{'|'.join(TIMM_NUM_HEADS)}}}_patch..., "
        f"and has no model_args.num_heads); pass num_heads explicitly")
  kernel = _required(tensors, "patch_embed.proj.weight", "timm")
  return dict(
      patch_size=_patch_size(kernel, "patch_embed.proj.weight"),
      hidden_size=kernel.shape[0],
      num_channels=kernel.shape[1],
      depth=_depth(tensors, r"blocks\.(\d+)\.", "timm"),
      num_heads=int(num_heads),
      mlp_dim=_required(tensors, "blocks.0.mlp.fc1.weight", "timm").shape[0],
      layer_norm_eps=TIMM_LAYER_NORM_EPS,
      grid=_grid(_required(tensors, "pos_embed", "timm"), "pos_embed"))


def _hf_arch(tensors: dict, config: dict, num_heads: int | None, p: str) -> dict[str, Any]:
  if not config:
    raise ValueError("transformers checkpoint without config.json: it is needed for the "
                     "number of heads, LayerNorm eps and activation; put it beside the weights")
  if config.get("model_type", "vit") != "vit":
    raise ValueError(f"config.json model_type={config['model_type']!r}: only 'vit' loads")
  act = config.get("hidden_act", HF_DEFAULT_HIDDEN_ACT)
  if act != "gelu":  # model.ViT uses exact (erf) GELU, which is transformers' "gelu"
    raise ValueError(f"config.json hidden_act={act!r}: model.ViT computes exact GELU, so only "
                     f"'gelu' loads (a tanh/quick GELU model would silently change outputs)")
  num_heads = num_heads if num_heads is not None else config.get("num_attention_heads")
  if num_heads is None:
    raise ValueError("config.json has no num_attention_heads; pass num_heads explicitly")
  kernel = _required(tensors, f"{p}embeddings.patch_embeddings.projection.weight", "transformers")
  return dict(
      patch_size=_patch_size(kernel, f"{p}embeddings.patch_embeddings.projection.weight"),
      hidden_size=kernel.shape[0],
      num_channels=kernel.shape[1],
      depth=_depth(tensors, re.escape(p) + r"encoder\.layer\.(\d+)\.", "transformers"),
      num_heads=int(num_heads),
      mlp_dim=_required(tensors, f"{p}encoder.layer.0.intermediate.dense.weight",
                        "transformers").shape[0],
      layer_norm_eps=float(config.get("layer_norm_eps", HF_DEFAULT_LAYER_NORM_EPS)),
      grid=_grid(_required(tensors, f"{p}embeddings.position_embeddings", "transformers"),
                 f"{p}embeddings.position_embeddings"))


# --------------------------------------------------------------------------- name mapping
# A plan maps each Flax parameter ("block0/attn/qkv/kernel") to the source tensors it is made
# of and the function that makes it. Both layouts are written out in full so the coverage
# check can name source keys.

Plan = dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]]


def _same(x):
  return x


def _dense(w_OxI):  # torch Linear (out, in) -> Flax Dense kernel (in, out)
  return w_OxI.T


def _conv(w_OxCxPxP):  # torch Conv2d OIHW -> Flax Conv HWIO (NCHW vs NHWC images)
  return w_OxCxPxP.transpose(2, 3, 1, 0)


def _qkv_kernel(q, k, v):  # timm's fused qkv is rows [q; k; v], heads contiguous in each
  return np.concatenate([q, k, v], 0).T


def _qkv_bias(q, k, v):
  return np.concatenate([q, k, v], 0)


def _layer_norm(target: str, source: str) -> Plan:
  return {f"{target}/scale": ((f"{source}.weight",), _same),
          f"{target}/bias": ((f"{source}.bias",), _same)}


def _linear(target: str, source: str) -> Plan:
  return {f"{target}/kernel": ((f"{source}.weight",), _dense),
          f"{target}/bias": ((f"{source}.bias",), _same)}


def _timm_plan(depth: int, p: str) -> Plan:
  del p  # timm keys have no prefix
  plan = {"cls_token": (("cls_token",), _same),
          "pos_embed": (("pos_embed",), _same),
          "patch_embed/kernel": (("patch_embed.proj.weight",), _conv),
          "patch_embed/bias": (("patch_embed.proj.bias",), _same),
          **_layer_norm("norm", "norm")}
  for i in range(depth):
    t, s = f"block{i}", f"blocks.{i}"
    plan.update({**_layer_norm(f"{t}/norm1", f"{s}.norm1"),
                 **_linear(f"{t}/attn/qkv", f"{s}.attn.qkv"),
                 **_linear(f"{t}/attn/proj", f"{s}.attn.proj"),
                 **_layer_norm(f"{t}/norm2", f"{s}.norm2"),
                 **_linear(f"{t}/fc1", f"{s}.mlp.fc1"),
                 **_linear(f"{t}/fc2", f"{s}.mlp.fc2")})
  return plan


def _hf_plan(depth: int, p: str) -> Plan:
  """`p`: "vit." for ViTForImageClassification, "" for a saved ViTModel."""
  plan = {"cls_token": ((f"{p}embeddings.cls_token",), _same),
          "pos_embed": ((f"{p}embeddings.position_embeddings",), _same),
          "patch_embed/kernel": ((f"{p}embeddings.patch_embeddings.projection.weight",), _conv),
          "patch_embed/bias": ((f"{p}embeddings.patch_embeddings.projection.bias",), _same),
          **_layer_norm("norm", f"{p}layernorm")}
  for i in range(depth):
    t, s = f"block{i}", f"{p}encoder.layer.{i}"
    qkv = tuple(f"{s}.attention.attention.{n}" for n in ("query", "key", "value"))
    plan.update({**_layer_norm(f"{t}/norm1", f"{s}.layernorm_before"),
                 f"{t}/attn/qkv/kernel": (tuple(f"{n}.weight" for n in qkv), _qkv_kernel),
                 f"{t}/attn/qkv/bias": (tuple(f"{n}.bias" for n in qkv), _qkv_bias),
                 **_linear(f"{t}/attn/proj", f"{s}.attention.output.dense"),
                 **_layer_norm(f"{t}/norm2", f"{s}.layernorm_after"),
                 **_linear(f"{t}/fc1", f"{s}.intermediate.dense"),
                 **_linear(f"{t}/fc2", f"{s}.output.dense")})
  return plan


def _detect_layout(tensors: dict) -> tuple[str, str]:
  """(layout, prefix of the backbone's keys)."""
  if "patch_embed.proj.weight" in tensors:
    return "timm", ""
  for prefix in ("vit.", ""):
    if f"{prefix}embeddings.patch_embeddings.projection.weight" in tensors:
      return "transformers", prefix
  raise ValueError(f"unrecognised checkpoint layout (keys {_names(sorted(tensors))}): expected "
                   f"timm's ViT (patch_embed.proj.weight, blocks.N...) or transformers' "
                   f"ViT (vit.embeddings..., vit.encoder.layer.N...)")


# --------------------------------------------------------------------------- conversion


def _names(keys) -> str:
  keys = list(keys)
  more = f" +{len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else ""
  return ", ".join(keys[:_MAX_NAMED]) + more


def _resize_pos_embed(pos_1xLxD: np.ndarray, grid: int) -> np.ndarray:
  """Resamples the patch-grid part of a (1, 1 + g*g, D) position embedding to grid x grid.

  Bilinear on the 2-D grid, as big_vision's `resample_posemb` (timm's
  `resample_abs_pos_embed` does the same, bicubic by default); the class-token row is kept.
  Fine-tuning at another resolution is the standard recipe (ViT paper, sec. 3.2).
  """
  cls_1x1xD, patches_1xNxD = pos_1xLxD[:, :1], pos_1xLxD[:, 1:]
  g, D = math.isqrt(patches_1xNxD.shape[1]), pos_1xLxD.shape[-1]
  if g == grid:  # exact identity, not a resampling round trip
    return pos_1xLxD
  resized = jax.image.resize(patches_1xNxD.reshape(1, g, g, D), (1, grid, grid, D), "bilinear")
  return np.concatenate([cls_1x1xD, np.asarray(resized).reshape(1, grid * grid, D)], 1)


def _convert(plan: Plan, tensors: dict, allowed_unused, layout: str) -> dict[str, np.ndarray]:
  """Flat Flax params from `plan`; raises naming missing or unused source tensors."""
  needed = [k for keys, _ in plan.values() for k in keys]
  missing = [k for k in needed if k not in tensors]
  unexpected = sorted(set(tensors) - set(needed) - set(allowed_unused))
  if missing or unexpected:
    raise ValueError(f"{layout} checkpoint does not match model.ViT: "
                     f"missing {_names(missing) or 'none'}; "
                     f"unexpected {_names(unexpected) or 'none'}")
  flat, broken = {}, []
  for target, (keys, fn) in plan.items():
    try:
      flat[target] = np.ascontiguousarray(fn(*(np.asarray(tensors[k], np.float32)
                                               for k in keys)))
    except ValueError:  # e.g. q, k, v of different shapes
      broken.append(f"{'+'.join(keys)} {[tensors[k].shape for k in keys]}")
  if broken:
    raise ValueError(f"{layout} checkpoint: tensors with inconsistent shapes: {_names(broken)}")
  return flat


def _check_shapes(flat: dict, expected: dict, plan: Plan, layout: str) -> None:
  unfilled = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = [f"{'+'.join(plan[k][0])} (as {k} {flat[k].shape}, model {expected[k].shape})"
           for k in flat if k in expected and flat[k].shape != expected[k].shape]
  if unfilled or extra or wrong:
    raise ValueError(f"{layout} checkpoint does not match model.ViT: "
                     f"unfilled params {_names(unfilled) or 'none'}; "
                     f"unmapped {_names(extra) or 'none'}; "
                     f"shape mismatch {_names(wrong) or 'none'}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_head(vit: model_lib.ViT, image_shape: tuple[int, ...], rng: jax.Array) -> dict:
  """The head `model.init_params(vit, rng, ...)` would give, without building the rest.

  The whole init is traced but only the head is returned, so XLA drops the other
  parameters' work; jit's cache (keyed on the hashable module) skips recompiling on reloads.
  """
  return vit.init(rng, jnp.zeros(image_shape, jnp.float32))["params"]["head"]


def load_pretrained(source: str, *, num_classes: int, rng: jax.Array,
                    image_size: int | None = None, num_heads: int | None = None,
                    dtype=jnp.float32) -> tuple[dict[str, Any], dict]:
  """(model.ViT kwargs, params) from a pretrained source, with a fresh `num_classes` head.

  Args:
    source: a .safetensors file, a folder with model.safetensors, or a hub id org/name.
    num_classes: classes of the new, freshly initialised head.
    rng: PRNG key for that head (same initialiser and key use as `model.init_params`).
    image_size: input size to build for; default the source's. When it differs, the position
      embedding grid is resampled bilinearly.
    num_heads: overrides the head count read from config.json.
    dtype: compute dtype of the ViT the head is initialised with; params stay float32.

  Returns:
    `model.ViT(**kwargs)` arguments (no dtype) and its float32 params as host numpy arrays.
    Images must have as many channels as the source (params["patch_embed"]["kernel"].shape[2]).
  """
  num_classes = operator.index(num_classes)
  if num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  tensors, config = read_source(source)
  layout, prefix = _detect_layout(tensors)
  arch_fn, plan_fn = (_timm_arch, _timm_plan) if layout == "timm" else (_hf_arch, _hf_plan)
  arch = arch_fn(tensors, config, num_heads, prefix)
  P, D, H = arch["patch_size"], arch["hidden_size"], arch["num_heads"]
  image_size = arch["grid"] * P if image_size is None else image_size
  if image_size % P:
    raise ValueError(f"image_size {image_size} is not a multiple of the patch size {P}")
  if D % H:
    raise ValueError(f"hidden size {D} is not divisible by num_heads {H}")
  kwargs = dict(num_classes=num_classes, image_size=image_size, patch_size=P, hidden_size=D,
                depth=arch["depth"], num_heads=H, mlp_dim=arch["mlp_dim"],
                layer_norm_eps=arch["layer_norm_eps"])

  plan = plan_fn(arch["depth"], prefix)
  allowed = HEAD_KEYS[layout] + tuple(prefix + k for k in IGNORED_KEYS[layout])
  flat = _convert(plan, tensors, allowed, layout)
  flat["pos_embed"] = _resize_pos_embed(flat["pos_embed"], image_size // P)

  vit = model_lib.ViT(**kwargs, dtype=dtype)
  image_shape = (1, image_size, image_size, arch["num_channels"])
  init = lambda r: vit.init(r, jnp.zeros(image_shape, jnp.float32))["params"]
  expected = flax.traverse_util.flatten_dict(jax.eval_shape(init, rng), sep="/")
  body = {k: v for k, v in expected.items() if not k.startswith("head/")}
  _check_shapes(flat, body, plan, layout)
  flat.update({f"head/{k}": np.asarray(v) for k, v in _init_head(vit, image_shape, rng).items()})
  return kwargs, flax.traverse_util.unflatten_dict(flat, sep="/")
