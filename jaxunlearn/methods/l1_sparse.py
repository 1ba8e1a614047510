"""l1-sparse: fine-tuning on the retain set with a decaying l1 penalty on the weights.

Reference: Jia et al., "Model Sparsity Can Simplify Machine Unlearning" (NeurIPS
2023), Unlearn-Sparse `unlearn/FT.py` (FT_l1): loss = CE(retain) + a_e * sum |theta|
over every parameter, a_e = alpha * (1 - e / epochs) in epoch e (constant within
an epoch, linear to 0 over the run), SGD momentum 0.9, weight decay 5e-4, lr 0.01,
10 epochs. alpha is searched there (5e-5 .. 5e-4); 1e-4 here.

Modes: train mode, as `FT.py` (FT_l1).
Augmentation (with `data.augment`): yes, as FT.
"""
from jaxunlearn import fields, losses, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "l1-sparse"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training(alpha=search.Range(1e-6, 1e-3, log=True))


def get_config():
  return base.section(learning_rate=0.01, epochs=10, weight_decay=5e-4, alpha=1e-4)


def ce_l1(ctx, params, batch):
  b = batch["data"]
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  ce = losses.cross_entropy(logits_BxC, b["label"], b["mask"])
  l1 = losses.l1_norm(params)
  return ce + ctx.hp["alpha"] * l1, {"l1": l1}


def recipe(s):
  opt = base.optimizer(s)
  # One phase per epoch: its coefficient is a traced value, so all share one compile.
  return train.Recipe([
      train.Phase(f"epoch{e}", ce_l1, {"data": train.Stream("retain", epochs=1)}, opt,
                  hparams={"alpha": s.alpha * (1 - e / s.epochs)}) for e in range(s.epochs)])


def validate(c, name):
  base.validate_optimizer(c, name)
  fields.check_float(c, f"{name}.alpha", 0)
