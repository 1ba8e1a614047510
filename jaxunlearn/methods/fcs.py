"""FCS: the NeurIPS 2023 unlearning competition solution the study's two-stage method comes from.

Reference: fanchuan's 2nd-place solution, as xcadet/deepunlearn
`munl/unlearning/kgltop1.py` runs it. Three SGD optimizers (momentum 0.9), each
with its own state. Stage 1: one pass over all forget batches of KL(uniform || p)
(lr 5e-3). Stage 2, per epoch: a forget round, each forget batch paired with a
retain batch, minimising the contrastive term alone, mean over all pairs of
-log_softmax(z_f stop_grad(z_r)^T / tau) on the logits (lr 3e-4, cosine-decayed to
1e-6 over all forget-round steps of all epochs); then a separate pass over the
retain set of cross-entropy (lr 1e-3 * batch / 64 = 4e-3 at the reference's batch
256, weight decay 1e-2). tau 1.15, 8 epochs.

The retain learning rate is not rescaled with the batch size: like every learning
rate in our configs, `retain_learning_rate` is the rate the step uses, so a search
or an override means what it says. The default is the reference's rule at its batch
256; at another `batch_size`, set it to 1e-3 * batch_size / 64 to follow the rule.

How the study's two-stage (`two_stage.py`) differs: one stage-1 step, one
optimizer with a constant lr, and in stage 2 the contrastive term and the retain
cross-entropy summed in one step, with both batches cut to their common size.

Modes: train mode in every stage; the forget and retain batches of a forget round are
two forward passes (each its own BatchNorm statistics; running statistics updated
twice per step, forget first), as `kgltop1.py`.
Augmentation (with `data.augment`): yes (the training transform of deepunlearn's loaders).
"""
from jaxunlearn import fields, losses, objectives, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "FCS"
# What a tuning run searches (`search.py`): the three learning rates and the epochs.
SEARCH_SPACE = search.training(stage1_learning_rate=search.Range(1e-5, 1e-1, log=True),
                               retain_learning_rate=search.Range(1e-5, 1e-1, log=True))


def get_config():
  # The section's optimizer is the forget rounds' (cosine to final_learning_rate over
  # all their steps); stage 1 and the retain passes have their own, constant rates.
  return base.section(
      learning_rate=3e-4, epochs=8, temperature=1.15, schedule="cosine",
      final_learning_rate=1e-6, stage1_learning_rate=5e-3,
      # The rate used, not rescaled: kgltop1.py's 1e-3 * batch / 64 at its batch 256.
      retain_learning_rate=4e-3, retain_weight_decay=1e-2)


def contrastive(ctx, params, batch):
  f, r = batch["forget"], batch["retain"]
  z_f, _ = ctx.apply(params, f["image"], mask=f["mask"])
  z_r, _ = ctx.apply(params, r["image"], mask=r["mask"])
  return losses.contrastive(z_f, z_r, f["mask"], r["mask"], ctx.hp["temperature"]), {}


def recipe(s):
  constant = dict(schedule="constant", warmup_epochs=0.0)
  stage1 = base.optimizer(s, "stage1", learning_rate=s.stage1_learning_rate, weight_decay=0.0,
                          **constant)
  forget = base.optimizer(s, "forget")
  retain = base.optimizer(s, "retain", learning_rate=s.retain_learning_rate,
                          weight_decay=s.retain_weight_decay, **constant)
  phases = [train.Phase("stage1", objectives.kl_uniform, {"data": train.Stream("forget", epochs=1)},
                        stage1)]
  for e in range(s.epochs):
    phases += [
        train.Phase(f"forget{e}", contrastive,
                    {"forget": train.Stream("forget", epochs=1), "retain": train.Stream("retain")},
                    forget, hparams={"temperature": s.temperature}),
        train.Phase(f"retain{e}", objectives.cross_entropy,
                    {"data": train.Stream("retain", epochs=1)}, retain)]
  return train.Recipe(phases)


def validate(c, name):
  base.validate_optimizer(c, name)
  fields.check_float(c, f"{name}.temperature", 0, open_low=True)
  for field in ("stage1_learning_rate", "retain_learning_rate"):
    fields.check_float(c, f"{name}.{field}", 0, open_low=True)
  fields.check_float(c, f"{name}.retain_weight_decay", 0)
