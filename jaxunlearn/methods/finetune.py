"""Fine-tuning (FT): cross-entropy on the retain set only.

Reference: Jia et al., "Model Sparsity Can Simplify Machine Unlearning" (NeurIPS
2023), OPTML-Group/Unlearn-Sparse `unlearn/FT.py`: one pass over the retain set per
epoch, SGD momentum 0.9, weight decay 5e-4, lr 0.01, 10 epochs. (The study's
fine-tuning is the same with lr 1e-4 and 5 epochs: the study configs set that.)

Modes: train mode (BatchNorm on batch statistics, running ones updated), as `FT.py`'s
`model.train()` loop.
Augmentation (with `data.augment`): yes, Unlearn-Sparse's retain loader reads the training transform.
"""
from jaxunlearn import objectives, search, train
from jaxunlearn.methods import base

DISPLAY_NAME = "Fine-tuning"
# What a tuning run searches (`search.py`); the reference's grids.
SEARCH_SPACE = search.training()


def get_config():
  return base.section(learning_rate=0.01, epochs=10, weight_decay=5e-4)


def recipe(s):
  return train.Recipe([train.Phase("finetune", objectives.cross_entropy,
                                   {"data": train.Stream("retain", epochs=s.epochs)}, base.optimizer(s))])


validate = base.validate_optimizer
