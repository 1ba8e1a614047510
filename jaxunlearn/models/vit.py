"""Vision Transformer (Linen) with the layout of timm's / the ViT paper's ViT: `--config.model.name=vit`.

The module is stateless: parameters are a plain pytree, so every train step is a
pure function; train and eval mode are the same (no dropout, no BatchNorm). It
returns logits and the features the study uses for t-SNE (the class token after
the final LayerNorm). Its config section is `config.model.vit`; pretrained
weights (`config.model.init`) are converted by `weights.py`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxunlearn import fields
from jaxunlearn.models import base

# Registered architectures, named as in the ViT paper. Ti/16 is timm's
# vit_tiny_patch16_224 (the study's model).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti/16": dict(patch_size=16, hidden_size=192, depth=12, num_heads=3, mlp_dim=768),
    "S/16": dict(patch_size=16, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "B/16": dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
}

# Truncated-normal(0.02) is timm's and transformers' ViT initialisation.
_init = nn.initializers.truncated_normal(0.02)


class Dense(nn.Module):
  """`nn.Dense` over the last axis, computed as one 2-D matmul.

  Flattening the leading axes first gives the weight gradient a single contracting
  axis, so XLA:CPU emits plain GEMMs for it instead of transposing activations
  (~1.6x faster backward for the ViT-Ti layers on CPU); same parameters as nn.Dense.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _init, (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    y = x.reshape(-1, x.shape[-1]) @ kernel + bias
    return y.reshape(*x.shape[:-1], self.features)


class PatchEmbed(nn.Module):
  """Non-overlapping P x P patches -> D features: a stride-P convolution.

  Written as reshape + one matmul, which XLA compiles to a plain GEMM on every
  backend; XLA:CPU runs the equivalent strided convolution up to 10x slower
  inside a training loop. Parameters keep the convolution's layout (P, P, C, D).
  """
  patch_size: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWxC):
    B, H, W, C = images_BxHxWxC.shape
    P, D = self.patch_size, self.features
    kernel = self.param("kernel", _init, (P, P, C, D))
    bias = self.param("bias", nn.initializers.zeros, (D,))
    x = images_BxHxWxC.reshape(B, H // P, P, W // P, P, C).astype(self.dtype)
    x_BxhxwxD = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(self.dtype))
    return x_BxhxwxD + bias.astype(self.dtype)


def _softmax_f32(logits_NxQxS):
  # Softmax in float32 even under bf16 compute.
  return jax.nn.softmax(logits_NxQxS.astype(jnp.float32), axis=-1)


@jax.custom_vjp
def attend(q_NxLxK, k_NxLxK, v_NxLxK):
  """softmax(q k^T) v over a flat batch N = batch x heads (q already scaled).

  Equal to autodiff of the plain formula (tests check it). The hand-written
  backward keeps every matmul a 3-D batched GEMM with one contracting axis:
  XLA:CPU runs that ~1.5x faster than autodiff's layout, with fewer transposes.
  """
  return _attend_fwd(q_NxLxK, k_NxLxK, v_NxLxK)[0]


def _attend_fwd(q, k, v):
  w_NxQxS = _softmax_f32(q @ jnp.swapaxes(k, 1, 2)).astype(q.dtype)
  return w_NxQxS @ v, (q, k, v, w_NxQxS)


def _attend_bwd(res, do_NxQxK):
  q, k, v, w = res
  dv = jnp.einsum("nqs,nqk->nsk", w, do_NxQxK)
  dw = (do_NxQxK @ jnp.swapaxes(v, 1, 2)).astype(jnp.float32)
  w32 = w.astype(jnp.float32)
  ds = (w32 * (dw - jnp.sum(dw * w32, axis=-1, keepdims=True))).astype(q.dtype)
  return ds @ k, jnp.einsum("nqs,nqk->nsk", ds, q), dv


attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (as in timm)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    B, L, D = x_BxLxD.shape
    H = self.num_heads
    qkv = Dense(3 * D, self.dtype, name="qkv")(x_BxLxD)
    # (B, L, 3, H, K) -> (3, B*H, L, K): heads become batch rows of 3-D matmuls.
    qkv_3xNxLxK = qkv.reshape(B, L, 3, H, D // H).transpose(2, 0, 3, 1, 4).reshape(3, B * H, L, -1)
    q, k, v = qkv_3xNxLxK[0], qkv_3xNxLxK[1], qkv_3xNxLxK[2]
    out_NxLxK = attend(q * (D // H) ** -0.5, k, v)
    out_BxLxD = out_NxLxK.reshape(B, H, L, -1).transpose(0, 2, 1, 3).reshape(B, L, D)
    return Dense(D, self.dtype, name="proj")(out_BxLxD)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    D = x_BxLxD.shape[-1]
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    x_BxLxD = x_BxLxD + Attention(self.num_heads, self.dtype, name="attn")(ln("norm1")(x_BxLxD))
    h = Dense(self.mlp_dim, self.dtype, name="fc1")(ln("norm2")(x_BxLxD))
    # Exact (erf) GELU, as in timm and transformers, so converted weights reproduce them.
    h = nn.gelu(h, approximate=False)
    return x_BxLxD + Dense(D, self.dtype, name="fc2")(h)


class ViT(nn.Module):
  """ViT classifier. `__call__` maps images (B, H, W, C) to (logits, features)."""
  num_classes: int
  image_size: int
  patch_size: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWxC):
    if images_BxHxWxC.shape[1] != self.image_size or images_BxHxWxC.shape[2] != self.image_size:
      raise ValueError(f"ViT expects {self.image_size}x{self.image_size} images, got "
                       f"{images_BxHxWxC.shape[1]}x{images_BxHxWxC.shape[2]}")
    P, D = self.patch_size, self.hidden_size
    if self.image_size % P:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {P}")
    x = PatchEmbed(P, D, self.dtype, name="patch_embed")(images_BxHxWxC)
    B = x.shape[0]
    x_BxNxD = x.reshape(B, -1, D)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, D))
    x_BxLxD = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, D)).astype(self.dtype), x_BxNxD], 1)
    pos = self.param("pos_embed", _init, (1, x_BxLxD.shape[1], D))
    x_BxLxD = x_BxLxD + pos.astype(self.dtype)
    for i in range(self.depth):
      x_BxLxD = EncoderBlock(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dtype,
                             name=f"block{i}")(x_BxLxD)
    x_BxLxD = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(x_BxLxD)
    features_BxD = x_BxLxD[:, 0]
    logits_BxC = Dense(self.num_classes, self.dtype, name="head")(features_BxD)
    return logits_BxC.astype(jnp.float32), features_BxD.astype(jnp.float32)


def model_kwargs(model_config, num_classes: int) -> dict[str, Any]:
  """ViT keyword arguments from a `config.model.vit` section (a variant name or explicit sizes)."""
  kw = dict(num_classes=num_classes, image_size=model_config.image_size,
            layer_norm_eps=model_config.layer_norm_eps)
  if model_config.variant:
    kw.update(VARIANTS[model_config.variant])
  else:
    kw.update({k: model_config[k] for k in
               ("patch_size", "hidden_size", "depth", "num_heads", "mlp_dim")})
  return kw


def create(model_config, num_classes: int, dtype=jnp.float32) -> ViT:
  return ViT(**model_kwargs(model_config, num_classes), dtype=dtype)


def init_params(model: ViT, rng: jax.Array, num_channels: int):
  """Parameters of `model`, created by a jitted init (no host-side weights)."""
  shape = (1, model.image_size, model.image_size, num_channels)
  return jax.jit(lambda r: model.init(r, jnp.zeros(shape, jnp.float32)))(rng)["params"]


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


SECTION = "vit"
PRETRAINED = True  # timm / transformers safetensors, `weights.py`


def get_config() -> ml_collections.ConfigDict:
  """`config.model.vit`: the sizes, or a registered variant."""
  return ml_collections.ConfigDict(dict(
      # Registered architecture ("Ti/16", ...), or "" to use the explicit sizes below.
      variant="",
      # Input resolution in pixels; images are resized to it (bilinear) inside the step.
      image_size=8,
      patch_size=2,  # pixels per patch side
      hidden_size=64,  # token width
      depth=4,  # transformer blocks
      num_heads=4,
      mlp_dim=128,  # hidden units of each block's MLP
      layer_norm_eps=1e-6,  # added to the variance in every LayerNorm (> 0)
  ))


def validate(c, name: str | None, num_classes: int) -> None:
  """Checks `config.model.vit` (`name`: "vit" when it is the chosen model, else None)."""
  s = "model.vit"
  fields.check_str(c, f"{s}.variant")
  if c.model.vit.variant and c.model.vit.variant not in VARIANTS:
    fields.fail(f"{s}.variant", f"unknown variant {c.model.vit.variant!r}; allowed: \"\" or "
                f"{', '.join(VARIANTS)}")
  for field in ("image_size", "patch_size", "hidden_size", "depth", "num_heads", "mlp_dim"):
    fields.check_int(c, f"{s}.{field}")
  fields.check_float(c, f"{s}.layer_norm_eps", 0, open_low=True)
  if name and not c.model.init:  # with weights, the sizes are the weights' (checked when loaded)
    sizes = model_kwargs(c.model.vit, num_classes)
    field = f"{s}.variant" if c.model.vit.variant else f"{s}.patch_size"
    if sizes["image_size"] % sizes["patch_size"]:
      fields.fail(field, f"patch size {sizes['patch_size']} does not divide "
                  f"image_size {sizes['image_size']}")
    field = f"{s}.variant" if c.model.vit.variant else f"{s}.num_heads"
    if sizes["hidden_size"] % sizes["num_heads"]:
      fields.fail(field, f"{sizes['num_heads']} heads do not divide hidden_size "
                  f"{sizes['hidden_size']}")


def build(config, name: str, num_classes: int, image_shape: tuple[int, ...], rng, dtype):
  """(Model, variables): pretrained (head re-initialised) or a random initialisation."""
  del name
  s = config.model.vit
  if not config.model.init:
    vit = create(s, num_classes, dtype)
    return base.Model(vit, image_size=vit.image_size), {"params": init_params(vit, rng, image_shape[-1])}
  from jaxunlearn import weights
  kwargs, params = weights.load_pretrained(config.model.init, num_classes=num_classes, rng=rng,
                                           image_size=s.image_size)
  if s.variant:
    want = VARIANTS[s.variant]
    got = {k: kwargs[k] for k in want}
    if got != want:
      raise ValueError(f"config.model.vit.variant: {s.variant} is {want}, but "
                       f"{config.model.init} holds {got}; set variant to \"\" or match the weights")
  channels = params["patch_embed"]["kernel"].shape[2]
  if channels != image_shape[-1]:
    raise ValueError(f"config.model.init: the weights take {channels}-channel images, "
                     f"{config.data.name} has {image_shape[-1]}")
  vit = ViT(**kwargs, dtype=dtype)
  return base.Model(vit, image_size=vit.image_size), {"params": params}
