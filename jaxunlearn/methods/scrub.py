"""SCRUB: a student that moves away from the Original on the forget set and stays close on the rest.

Reference: Kurmanji et al., "Towards Unbounded Machine Unlearning" (NeurIPS 2023),
meghdadk/SCRUB `thirdparty/repdistiller/helper/loops.py` (train_distill) and
`distiller_zoo/KD.py`. Teacher: the frozen Original. KL_T(s, t) = KL(softmax(t/T)
|| softmax(s/T)) * T^2 (batchmean). Epoch e (from 1): while e <= msteps, a max pass
over the forget set minimising -KL_T; then a min pass over the retain set
minimising gamma * CE + alpha * KL_T. One SGD across all passes. Large-scale
defaults: T 4, gamma 0.99, alpha 0.001, msteps 2, 3 epochs, lr 5e-4, momentum 0.9,
weight decay 5e-4. The reference's batches are 512 (forget) and 256 (retain):
`forget_batch_size` and `batch_size` set them (0: config.batch_size, the
default, which keeps the small digits runs meaningful). The teacher's logits are computed once
for every training example (`base.logits_table`): the same numbers as a frozen
teacher's forward in each step, at a fraction of the cost.

Modes: the student in train mode in both passes, the teacher in eval mode
(`model_t.eval()`): its logits table comes from an eval-mode sweep.
Augmentation: none, whatever `data.augment` says: the large-scale notebook builds its
loaders with `augment=False`.
"""
from jaxunlearn import fields, losses, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "SCRUB"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training(alpha=search.Range(1e-4, 1.0, log=True),
                               gamma=search.Range(0.1, 1.0),
                               max_epochs=search.Range(1, 5, integer=True))


def get_config():
  return base.section(learning_rate=5e-4, epochs=3, weight_decay=5e-4, temperature=4.0,
                      gamma=0.99, alpha=0.001, max_epochs=2,
                      forget_batch_size=0)  # the max passes' batch (0: the section's batch_size)


def _kl(ctx, params, b):
  logits_BxC, _ = ctx.apply(params, b["image"], mask=b["mask"])
  return logits_BxC, losses.distill_kl(logits_BxC, b["teacher_logits"], b["mask"],
                                       ctx.hp["temperature"])


def max_step(ctx, params, batch):
  _, kl = _kl(ctx, params, batch["data"])
  return -kl, {"kl": kl}


def min_step(ctx, params, batch):
  b = batch["data"]
  logits_BxC, kl = _kl(ctx, params, b)
  ce = losses.cross_entropy(logits_BxC, b["label"], b["mask"])
  return ctx.hp["gamma"] * ce + ctx.hp["alpha"] * kl, {"kl": kl, "ce": ce}


def recipe(s):
  opt = base.optimizer(s)
  phases = []
  for e in range(1, s.epochs + 1):
    if e <= s.max_epochs:
      forget = train.Stream("forget", epochs=1, batch_size=s.forget_batch_size or None,
                            augment=False)
      phases.append(train.Phase(f"max{e}", max_step, {"data": forget}, opt,
                                hparams={"temperature": s.temperature}))
    retain = train.Stream("retain", epochs=1, augment=False)
    phases.append(train.Phase(f"min{e}", min_step, {"data": retain},
                              opt, hparams={"temperature": s.temperature, "gamma": s.gamma,
                                            "alpha": s.alpha}))
  return train.Recipe(phases, prepare=base.logits_table("all"))


def validate(c, name):
  base.validate_optimizer(c, name)
  fields.check_float(c, f"{name}.temperature", 0, open_low=True)
  fields.check_float(c, f"{name}.gamma", 0)
  fields.check_float(c, f"{name}.alpha", 0)
  fields.check_int(c, f"{name}.max_epochs", 0)
  fields.check_int(c, f"{name}.forget_batch_size", 0)
