"""The architectures, by the name `config.model.name` gives.

Each architecture is one module here that states only what is particular to it:
  SECTION                 its config section, `config.model.<SECTION>`;
  get_config()            that section, with defaults;
  validate(c, name, num_classes)   checks of the section (name: the chosen one, or None);
  PRETRAINED              optional: True if `config.model.init` weights can be loaded;
  build(config, name, num_classes, image_shape, rng, dtype) -> (base.Model, variables).
Several names may share a module (resnet18/34/50 are one ResNet with other depths).
To add an architecture: write its module and add its names to ARCHITECTURES.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jaxunlearn import fields
from jaxunlearn.models import resnet, vit
from jaxunlearn.models.base import Model, check_outputs, model_state, num_params

ARCHITECTURES = {"vit": vit, **{name: resnet for name in resnet.VARIANTS}}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_config() -> ml_collections.ConfigDict:
  """`config.model`: which architecture, its dtype and weights, and every architecture's section."""
  c = ml_collections.ConfigDict()
  # Architecture: "vit", "resnet18", "resnet34" or "resnet50" (sizes in its section below).
  c.name = "vit"
  # Compute dtype: "float32" (matches the references) or "bfloat16" (parameters,
  # optimizer state and BatchNorm statistics stay float32; softmax and logits are
  # computed in float32).
  c.dtype = "float32"
  # Pretrained weights to start from (safetensors file, folder or hub id; the ViT),
  # or None to train from a random initialisation. With weights, the architecture
  # (sizes, LayerNorm eps) is read from the source, and must equal `vit.variant`
  # when that is set; vit.image_size still sets the input resolution (position
  # embeddings are resized to it). The head is always re-initialised.
  c.init = ml_collections.FieldReference(None, field_type=str)
  for module in dict.fromkeys(ARCHITECTURES.values()):
    c[module.SECTION] = module.get_config()
  return c


def validate(c, num_classes: int) -> None:
  """Checks `config.model`: the name, dtype, weights, and every architecture's section."""
  fields.check_choice(c, "model.name", tuple(ARCHITECTURES))
  fields.check_choice(c, "model.dtype", tuple(DTYPES))
  fields.check_str(c, "model.init", "a file, folder or hub id", optional=True)
  if c.model.init and not getattr(ARCHITECTURES[c.model.name], "PRETRAINED", False):
    fields.fail("model.init", f"pretrained weights are not supported for {c.model.name}; "
                "set model.init to None")
  for module in dict.fromkeys(ARCHITECTURES.values()):  # every section, also those not used
    module.validate(c, c.model.name if ARCHITECTURES[c.model.name] is module else None,
                    num_classes)


def build(config, num_classes: int, image_shape: tuple[int, ...], rng) -> tuple[Model, dict]:
  """The configured model and its initial variables ({"params", ...model state})."""
  name = config.model.name
  return ARCHITECTURES[name].build(config, name, num_classes, image_shape, rng,
                                   DTYPES[config.model.dtype])
