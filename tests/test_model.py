"""The ViT's hand-written pieces against independent references (numpy, autodiff, lax.conv).

The whole model is checked against transformers' PyTorch ViT in test_weights.py;
these tests pin each rewritten layer on its own, gradients included.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax as np_softmax

from jaxunlearn.models import vit as model

rng = np.random.default_rng(0)


def _plain_attention(q, k, v):
  # The textbook formula; autodiff gives its gradient.
  return jax.nn.softmax(jnp.einsum("nqk,nsk->nqs", q, k), axis=-1) @ v


def test_attend_matches_numpy():
  q, k, v = (rng.normal(size=(6, 17, 16)).astype(np.float32) for _ in range(3))
  want = np.einsum("nqs,nsk->nqk",
                   np_softmax(np.einsum("nqk,nsk->nqs", q.astype(np.float64), k), axis=-1), v)
  np.testing.assert_allclose(model.attend(q, k, v), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 17, 16), (3, 5, 64)])
def test_attend_gradient_matches_autodiff(shape):
  q, k, v = (jnp.asarray(rng.normal(size=shape) * 2, jnp.float32) for _ in range(3))
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)
  got = jax.grad(loss(model.attend), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(_plain_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attend_bfloat16_stays_close_to_float32():
  r = np.random.default_rng(1)
  q, k, v = (jnp.asarray(r.normal(size=(4, 9, 8)), jnp.float32) for _ in range(3))
  got = jax.grad(lambda *a: jnp.sum(model.attend(*a) ** 2), argnums=(0, 1, 2))(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)))
  want = jax.grad(lambda *a: jnp.sum(_plain_attention(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    # bf16 keeps ~3 significant digits: compare whole gradients, not single entries.
    assert np.linalg.norm(np.asarray(a, np.float32) - b) < 0.03 * np.linalg.norm(b)


def test_attention_module_matches_per_head_numpy():
  B, L, D, H = 2, 5, 12, 3
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  mod = model.Attention(num_heads=H)
  p = mod.init(jax.random.key(0), x)["params"]
  qkv = x @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
  q, k, v = np.split(qkv.reshape(B, L, 3, H, D // H), 3, axis=2)
  q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, L, H, K): timm's head layout
  w = np_softmax(np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(D // H), axis=-1)
  out = np.einsum("bhqs,bshk->bqhk", w, v).reshape(B, L, D)
  want = out @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
  np.testing.assert_allclose(mod.apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)


def test_patch_embed_is_the_strided_convolution():
  x = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  mod = model.PatchEmbed(patch_size=4, features=5)
  p = mod.init(jax.random.key(0), x)["params"]
  want = jax.lax.conv_general_dilated(x, p["kernel"], (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  got = mod.apply({"params": p}, x)
  assert got.shape == (2, 2, 3, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_matches_numpy_on_any_leading_shape():
  x = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  mod = model.Dense(features=7)
  p = mod.init(jax.random.key(0), x)["params"]
  want = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(mod.apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)


def test_image_size_must_be_a_multiple_of_the_patch():
  vit = model.ViT(num_classes=3, image_size=10, patch_size=4, hidden_size=8, depth=1,
                  num_heads=2, mlp_dim=8)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    vit.init(jax.random.key(0), jnp.zeros((1, 10, 10, 3)))
