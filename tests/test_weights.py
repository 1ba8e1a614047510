"""Importing pretrained weights: outputs match transformers' torch ViT; bad sources fail loudly.

Reference models are randomly initialised transformers ViTs (no downloads). Every tensor is
randomised, LayerNorm scales and biases included, so a swapped or transposed tensor shows.
"""
import json

import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxunlearn.models import vit as model_lib
from jaxunlearn import weights

TOL = 1e-4
SMALL = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
             num_attention_heads=3, intermediate_size=96)


def _hf_vit(cls=transformers.ViTForImageClassification, seed=0, **overrides):
  """A transformers ViT, fp32 eval mode, with every parameter random."""
  torch.manual_seed(seed)
  config = transformers.ViTConfig(**{**SMALL, "num_labels": 7, "hidden_act": "gelu",
                                     "layer_norm_eps": 1e-12, "qkv_bias": True, **overrides})
  hf = cls(config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      is_ln_scale = "layernorm" in name and name.endswith("weight")
      p.copy_((1.0 if is_ln_scale else 0.0) + 0.1 * torch.randn_like(p))
  return hf


def _save_hf(hf, folder):
  hf.save_pretrained(folder)  # safetensors + config.json
  return str(folder)


def _images(hf, batch=3, seed=1):
  size = hf.config.image_size
  return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _torch_outputs(hf, images_nchw):
  with torch.no_grad():
    features = hf.vit(images_nchw).last_hidden_state[:, 0]  # after vit.layernorm
    return hf(images_nchw).logits.numpy(), features.numpy()


def _flax_outputs(kwargs, params, images_nchw):
  images_nhwc = jnp.asarray(images_nchw.numpy().transpose(0, 2, 3, 1))
  logits, features = jax.jit(model_lib.ViT(**kwargs).apply)({"params": params}, images_nhwc)
  return np.asarray(logits), np.asarray(features)


def _with_torch_head(params, hf):
  """The import re-initialises the head; copy the torch classifier to compare logits."""
  head = {"kernel": hf.classifier.weight.detach().numpy().T,
          "bias": hf.classifier.bias.detach().numpy()}
  return {**params, "head": head}


def _timm_state_dict(hf_tensors, depth):
  """transformers -> timm names, written independently of jaxunlearn.weights."""
  t = {"cls_token": hf_tensors["vit.embeddings.cls_token"],
       "pos_embed": hf_tensors["vit.embeddings.position_embeddings"],
       "patch_embed.proj.weight": hf_tensors["vit.embeddings.patch_embeddings.projection.weight"],
       "patch_embed.proj.bias": hf_tensors["vit.embeddings.patch_embeddings.projection.bias"],
       "norm.weight": hf_tensors["vit.layernorm.weight"],
       "norm.bias": hf_tensors["vit.layernorm.bias"],
       "head.weight": hf_tensors["classifier.weight"],
       "head.bias": hf_tensors["classifier.bias"]}
  renames = {"norm1": "layernorm_before", "norm2": "layernorm_after",
             "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense"}
  for i in range(depth):
    src = f"vit.encoder.layer.{i}."
    for timm_name, hf_name in renames.items():
      for p in ("weight", "bias"):
        t[f"blocks.{i}.{timm_name}.{p}"] = hf_tensors[f"{src}{hf_name}.{p}"]
    for p in ("weight", "bias"):  # timm fuses [q; k; v] along the output axis
      t[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(
          [hf_tensors[f"{src}attention.attention.{n}.{p}"] for n in ("query", "key", "value")])
  return t


def _assert_matches(kwargs, params, hf, images):
  want_logits, want_features = _torch_outputs(hf, images)
  logits, features = _flax_outputs(kwargs, _with_torch_head(params, hf), images)
  assert np.abs(logits - want_logits).max() <= TOL
  assert np.abs(features - want_features).max() <= TOL


def _rewrite(folder, edit):
  """Edits the saved tensors in place with `edit(dict)`."""
  path = f"{folder}/model.safetensors"
  tensors = dict(safetensors.numpy.load_file(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)


# --------------------------------------------------------------------------- equivalence


def test_transformers_import_matches_torch(tmp_path):
  hf = _hf_vit()
  kwargs, params = weights.load_pretrained(_save_hf(hf, tmp_path), num_classes=7,
                                           rng=jax.random.key(0))
  assert kwargs == dict(num_classes=7, image_size=32, patch_size=8, hidden_size=48, depth=2,
                        num_heads=3, mlp_dim=96, layer_norm_eps=1e-12)  # eps from config.json
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  _assert_matches(kwargs, params, hf, _images(hf))


def test_transformers_vit_model_with_pooler_matches_torch(tmp_path):
  # A saved ViTModel has no `vit.` prefix, no classifier, and a pooler (allow-listed).
  hf = _hf_vit(transformers.ViTModel)
  folder = _save_hf(hf, tmp_path)
  assert "pooler.dense.weight" in safetensors.numpy.load_file(f"{folder}/model.safetensors")
  kwargs, params = weights.load_pretrained(folder, num_classes=4, rng=jax.random.key(0))
  images = _images(hf)
  with torch.no_grad():
    want = hf(images).last_hidden_state[:, 0].numpy()
  _, features = _flax_outputs(kwargs, params, images)
  assert np.abs(features - want).max() <= TOL


@pytest.mark.parametrize("heads_from", ["config_architecture", "config_model_args", "argument"])
def test_timm_layout_import_matches_torch(tmp_path, heads_from):
  hf = _hf_vit(layer_norm_eps=1e-6)  # timm's eps, which the timm layout implies
  hf_folder = _save_hf(hf, tmp_path / "hf")
  timm = _timm_state_dict(safetensors.numpy.load_file(f"{hf_folder}/model.safetensors"), 2)
  folder = tmp_path / "timm"
  folder.mkdir()
  safetensors.numpy.save_file(timm, str(folder / "model.safetensors"))
  # The head count is not in the shapes; the rule is: num_heads argument, else
  # config.json model_args.num_heads, else the timm size name (vit_tiny_... -> 3 heads).
  config = {"config_architecture": {"architecture": "vit_tiny_patch8_32"},
            "config_model_args": {"architecture": "custom", "model_args": {"num_heads": 3}},
            "argument": None}[heads_from]
  if config is not None:
    (folder / "config.json").write_text(json.dumps({**config, "global_pool": "token"}))
  source = str(folder if config is not None else folder / "model.safetensors")
  kwargs, params = weights.load_pretrained(
      source, num_classes=7, rng=jax.random.key(0),
      num_heads=3 if heads_from == "argument" else None)
  assert kwargs["num_heads"] == 3 and kwargs["layer_norm_eps"] == 1e-6
  _assert_matches(kwargs, params, hf, _images(hf))


def test_timm_layout_without_head_count_is_refused(tmp_path):
  hf_folder = _save_hf(_hf_vit(), tmp_path)
  path = str(tmp_path / "timm.safetensors")
  safetensors.numpy.save_file(
      _timm_state_dict(safetensors.numpy.load_file(f"{hf_folder}/model.safetensors"), 2), path)
  (tmp_path / "config.json").unlink()  # the sibling config.json is transformers', not timm's
  with pytest.raises(ValueError, match="pass num_heads"):
    weights.load_pretrained(path, num_classes=7, rng=jax.random.key(0))


def test_ti16_import_matches_torch_and_param_counts(tmp_path):
  ti16 = model_lib.VARIANTS["Ti/16"]
  hf = _hf_vit(image_size=224, patch_size=ti16["patch_size"], hidden_size=ti16["hidden_size"],
               num_hidden_layers=ti16["depth"], num_attention_heads=ti16["num_heads"],
               intermediate_size=ti16["mlp_dim"], num_labels=10)
  # Scale the random weights down so 12 random blocks stay well conditioned.
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if not ("layernorm" in name and name.endswith("weight")):
        p.mul_(0.3)
  kwargs, params = weights.load_pretrained(_save_hf(hf, tmp_path), num_classes=10,
                                           rng=jax.random.key(0))
  assert kwargs == dict(num_classes=10, image_size=224, **ti16, layer_norm_eps=1e-12)
  assert model_lib.num_params(params) == 5_526_346
  images = _images(hf, batch=2)
  with torch.no_grad():
    want_logits = hf(images).logits.numpy()
  logits, _ = _flax_outputs(kwargs, _with_torch_head(params, hf), images)
  assert np.abs(logits - want_logits).max() <= TOL


# By hand: patch_embed 147,648 + cls 192 + pos 37,824 + 12 blocks x 444,864 + norm 384
# = 5,524,416 for the backbone, plus the head: 193,000 (1000 classes) or 1,930 (10).
@pytest.mark.parametrize("num_classes, count", [(1000, 5_717_416), (10, 5_526_346)])
def test_ti16_param_count(num_classes, count):
  vit = model_lib.ViT(num_classes=num_classes, image_size=224, **model_lib.VARIANTS["Ti/16"])
  shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert model_lib.num_params(shapes["params"]) == count


def test_bfloat16_source_gives_float32_params(tmp_path):
  hf = _hf_vit()
  folder = _save_hf(hf.to(torch.bfloat16), tmp_path)
  tensors, config = weights.read_source(folder)
  assert str(tensors["vit.layernorm.weight"].dtype) == "bfloat16" and config["model_type"] == "vit"
  _, params = weights.load_pretrained(folder, num_classes=7, rng=jax.random.key(0))
  assert params["norm"]["scale"].dtype == np.float32
  np.testing.assert_array_equal(params["norm"]["scale"],
                                hf.vit.layernorm.weight.float().detach().numpy())


# --------------------------------------------------------------------------- head and pos_embed


def test_head_is_fresh_with_requested_classes(tmp_path):
  hf = _hf_vit()
  folder = _save_hf(hf, tmp_path)
  rng = jax.random.key(3)
  kwargs, params = weights.load_pretrained(folder, num_classes=5, rng=rng)
  assert params["head"]["kernel"].shape == (48, 5) and params["head"]["bias"].shape == (5,)
  # Same initialiser and key use as a freshly built model.
  fresh = model_lib.init_params(model_lib.ViT(**kwargs), rng, 3)["head"]
  np.testing.assert_array_equal(params["head"]["kernel"], fresh["kernel"])
  np.testing.assert_array_equal(params["head"]["bias"], fresh["bias"])
  # With the source's class count the head is still not the source's classifier.
  _, params7 = weights.load_pretrained(folder, num_classes=7, rng=rng)
  assert not np.allclose(params7["head"]["kernel"], hf.classifier.weight.detach().numpy().T)


def test_pos_embed_identity_at_source_size(tmp_path):
  hf = _hf_vit()
  _, params = weights.load_pretrained(_save_hf(hf, tmp_path), num_classes=7,
                                      rng=jax.random.key(0), image_size=32)
  np.testing.assert_array_equal(params["pos_embed"],
                                hf.vit.embeddings.position_embeddings.detach().numpy())


def test_pos_embed_resized_for_other_image_size(tmp_path):
  hf = _hf_vit()
  with torch.no_grad():  # a constant grid (per channel) must stay constant when resampled
    pos = hf.vit.embeddings.position_embeddings
    pos[:, 1:] = pos[:, 1:2].clone()
  folder = _save_hf(hf, tmp_path)
  kwargs, params = weights.load_pretrained(folder, num_classes=7, rng=jax.random.key(0),
                                           image_size=48)
  source = pos.detach().numpy()
  assert kwargs["image_size"] == 48 and params["pos_embed"].shape == (1, 1 + 6 * 6, 48)
  np.testing.assert_array_equal(params["pos_embed"][:, 0], source[:, 0])  # class token kept
  np.testing.assert_allclose(params["pos_embed"][:, 1:],
                             np.broadcast_to(source[:, 1:2], (1, 36, 48)), atol=1e-6)
  with pytest.raises(ValueError, match="multiple of the patch size 8"):
    weights.load_pretrained(folder, num_classes=7, rng=jax.random.key(0), image_size=50)


# --------------------------------------------------------------------------- refusals


def test_pickle_checkpoints_are_refused(tmp_path):
  hf = _hf_vit()
  path = tmp_path / "pytorch_model.bin"
  torch.save(hf.state_dict(), path)
  for source in (path, tmp_path):  # the file, and a folder that only holds a pickle
    with pytest.raises(ValueError, match=r"safetensors\.torch\.save_file") as e:
      weights.read_source(str(source))
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="pickle checkpoints are not loaded"):
    weights.load_pretrained(str(tmp_path / "missing.pth"), num_classes=7, rng=jax.random.key(0))


def test_missing_tensor_is_named(tmp_path):
  folder = _save_hf(_hf_vit(), tmp_path)
  _rewrite(folder, lambda t: t.pop("vit.encoder.layer.1.output.dense.bias"))
  with pytest.raises(ValueError, match=r"missing vit\.encoder\.layer\.1\.output\.dense\.bias"):
    weights.load_pretrained(folder, num_classes=7, rng=jax.random.key(0))


def test_unexpected_tensor_is_named(tmp_path):
  folder = _save_hf(_hf_vit(), tmp_path)
  _rewrite(folder, lambda t: t.update({"vit.encoder.layer.0.layer_scale": np.ones(48, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected vit\.encoder\.layer\.0\.layer_scale"):
    weights.load_pretrained(folder, num_classes=7, rng=jax.random.key(0))


@pytest.mark.parametrize("key, shape, message", [
    ("vit.encoder.layer.1.output.dense.weight", (48, 95),
     r"shape mismatch vit\.encoder\.layer\.1\.output\.dense\.weight"),
    ("vit.encoder.layer.0.attention.attention.key.weight", (48, 47),
     r"inconsistent shapes: .*attention\.attention\.key\.weight"),
])
def test_wrong_shape_is_named(tmp_path, key, shape, message):
  folder = _save_hf(_hf_vit(), tmp_path)
  _rewrite(folder, lambda t: t.update({key: np.zeros(shape, np.float32)}))
  with pytest.raises(ValueError, match=message):
    weights.load_pretrained(folder, num_classes=7, rng=jax.random.key(0))


def test_non_exact_gelu_is_refused(tmp_path):
  folder = _save_hf(_hf_vit(hidden_act="gelu_new"), tmp_path)
  with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
    weights.load_pretrained(folder, num_classes=7, rng=jax.random.key(0))


def test_unknown_layout_is_refused(tmp_path):
  path = str(tmp_path / "other.safetensors")
  safetensors.numpy.save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, path)
  with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
    weights.load_pretrained(path, num_classes=7, rng=jax.random.key(0))


# --------------------------------------------------------------------------- hub ids


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An empty hub cache in tmp_path with HF_HUB_OFFLINE set (read at import, so patched)."""
  cache = tmp_path / "hub"
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  return cache


def test_hub_id_not_cached_offline_says_what_to_do(offline_hub):
  with pytest.raises(OSError, match="could not be fetched.*local folder") as e:
    weights.read_source("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")
  assert "\n" not in str(e.value)


def test_hub_id_served_from_cache_offline(offline_hub, tmp_path):
  hf = _hf_vit()
  revision = "0123456789abcdef0123456789abcdef01234567"
  repo = offline_hub / "models--some-org--tiny-vit"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(revision)
  _save_hf(hf, repo / "snapshots" / revision)
  kwargs, params = weights.load_pretrained("some-org/tiny-vit", num_classes=7,
                                           rng=jax.random.key(0))
  _assert_matches(kwargs, params, hf, _images(hf))
