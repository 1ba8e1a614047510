"""DELETE: distil the Original's beliefs without the true class, on the forget set only.

Reference: Zhou et al., "Decoupled Distillation to Erase" (CVPR 2025),
shaaaaron/DELETE `method/delete.py`: target = softmax of the frozen Original's
logits with the true-class logit set to -1e10; minimise KL(target || student)
(batchmean) over forget batches; no retain data. SGD momentum 0.9, no weight decay,
lr 1e-4 (ResNet-18; 5e-5 for ViT-S/16), 20 epochs. The teacher's logits are
computed once (`base.logits_table`).

Modes: the student in train mode, the teacher in eval mode (its logits table comes
from an eval-mode sweep), as `delete.py`.
Augmentation (with `data.augment`): yes (`get_unlearn_loader` reads the training set with
RandomCrop + flip); the teacher table is computed on unaugmented images.
"""
import jax
import jax.numpy as jnp

from jaxunlearn import losses, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "DELETE"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training()


def get_config():
  return base.section(learning_rate=1e-4, epochs=20)


def decoupled_kl(ctx, params, batch):
  b = batch["data"]
  teacher_BxC = b["teacher_logits"]
  true_BxC = jax.nn.one_hot(b["label"], teacher_BxC.shape[-1], dtype=bool)
  target_BxC = jax.nn.softmax(jnp.where(true_BxC, -1e10, teacher_BxC), axis=-1)
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  return losses.kl_to_target(target_BxC, logits_BxC, b["mask"]), {}


def recipe(s):
  return train.Recipe([train.Phase("delete", decoupled_kl,
                                   {"data": train.Stream("forget", epochs=s.epochs)}, base.optimizer(s))],
                      prepare=base.logits_table("forget"))


validate = base.validate_optimizer
