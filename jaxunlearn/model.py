"""Vision Transformer (Linen) with the layout of timm's / the ViT paper's ViT.

The module is stateless: parameters are a plain pytree, so every train step is a
pure function. It returns logits and the features the study uses for t-SNE (the
class token after the final LayerNorm).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Registered architectures, named as in the ViT paper. Ti/16 is timm's
# vit_tiny_patch16_224 (the study's model).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti/16": dict(patch_size=16, hidden_size=192, depth=12, num_heads=3, mlp_dim=768),
    "S/16": dict(patch_size=16, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "B/16": dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
}

# Truncated-normal(0.02) is timm's and transformers' ViT initialisation.
_init = nn.initializers.truncated_normal(0.02)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (as in timm)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    D = x_BxLxD.shape[-1]
    H = self.num_heads
    qkv = nn.Dense(3 * D, kernel_init=_init, dtype=self.dtype, name="qkv")(x_BxLxD)
    q, k, v = jnp.split(qkv.reshape(*x_BxLxD.shape[:2], 3, H, D // H), 3, axis=2)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    scale = (D // H) ** -0.5
    logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK * scale, k_BxLxHxK)
    # Softmax in float32 even under bf16 compute.
    weights = jax.nn.softmax(logits_BxHxLxL.astype(jnp.float32), axis=-1)
    out_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", weights.astype(self.dtype), v_BxLxHxK)
    out_BxLxD = out_BxLxHxK.reshape(x_BxLxD.shape)
    return nn.Dense(D, kernel_init=_init, dtype=self.dtype, name="proj")(out_BxLxD)


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
    h = nn.Dense(self.mlp_dim, kernel_init=_init, dtype=self.dtype, name="fc1")(ln("norm2")(x_BxLxD))
    # Exact (erf) GELU, as in timm and transformers, so converted weights reproduce them.
    h = nn.gelu(h, approximate=False)
    return x_BxLxD + nn.Dense(D, kernel_init=_init, dtype=self.dtype, name="fc2")(h)


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
    x = nn.Conv(D, (P, P), strides=(P, P), padding="VALID", kernel_init=_init,
                dtype=self.dtype, name="patch_embed")(images_BxHxWxC.astype(self.dtype))
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
    logits_BxC = nn.Dense(self.num_classes, kernel_init=_init,
                          dtype=self.dtype, name="head")(features_BxD)
    return logits_BxC.astype(jnp.float32), features_BxD.astype(jnp.float32)


def model_kwargs(model_config, num_classes: int) -> dict[str, Any]:
  """ViT keyword arguments from a `config.model` section (a variant name or explicit sizes)."""
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
