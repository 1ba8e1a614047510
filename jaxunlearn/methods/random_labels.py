"""Random Labels (RL): relabel the forget set at random, keep training on the retain set.

Reference: Golatkar et al. 2020 / Fan et al., "SalUn" (ICLR 2024),
OPTML-Group/Unlearn-Saliency `Classification/unlearn/RL.py` (CIFAR-10 branch):
each epoch is a pass over the forget set with labels drawn uniformly from all C
classes (the true class included; fresh for every batch), then a pass over the
retain set with true labels; cross-entropy, one SGD (momentum 0.9, weight decay
5e-4) across both. lr 0.013, 10 epochs (the SalUn README's setting).

Modes: train mode in both passes, as `RL.py`.
Augmentation (with `data.augment`): yes, both passes (Unlearn-Saliency's loaders).
"""
import jax

from jaxunlearn import losses, objectives, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "Random Labels"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training()


def get_config():
  return base.section(learning_rate=0.013, epochs=10, weight_decay=5e-4)


def random_label_ce(ctx, params, batch):
  b = batch["data"]
  labels_B = jax.random.randint(ctx.rng, b["label"].shape, 0, ctx.num_classes)
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  return losses.cross_entropy(logits_BxC, labels_B, b["mask"]), {}


def phases(s) -> list[train.Phase]:
  opt = base.optimizer(s)
  out = []
  for e in range(s.epochs):
    out += [train.Phase(f"forget{e}", random_label_ce, {"data": train.Stream("forget", epochs=1)}, opt),
            train.Phase(f"retain{e}", objectives.cross_entropy,
                        {"data": train.Stream("retain", epochs=1)}, opt)]
  return out


def recipe(s):
  return train.Recipe(phases(s))


validate = base.validate_optimizer
