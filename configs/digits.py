"""The study on scikit-learn's digits: offline, from scratch, on a 2-core CPU.

  python -m jaxunlearn.main --config configs/digits.py --workdir /tmp/digits

Data: load_digits() (8x8, 1,797 images), stratified 25% test split
(random_state 0): 1,347 train / 450 test; forget class 0 (133 train, 45 test).

Model: no ImageNet weights exist for 8x8 digits, so Original and Gold are
trained from the same seeded random initialisation: a small ViT (patch 2 -> 16
tokens, width 64, depth 2, 4 heads, MLP 128, LayerNorm eps 1e-6; 69k parameters)
with the study's optimizer (SGD, momentum 0.9, constant lr, batch 64). From
scratch it needs a much larger lr than fine-tuning (0.02; shared/digits-notes.md:
0.05-0.1 is unstable) and 150 epochs to pass 95% retain test accuracy with some
margin (100 epochs: 95.06% for seed 42, 94.07% for seed 1; 150 epochs: 96.05% and
94.32%). Depth 2 rather than the notes' depth 4: the same accuracy here at half
the time per step.

Unlearning: the study's lr 1e-4, batch 64, temperature 1.15. Its "5 epochs"
are 5 x ceil(5000/64) = 395 forget-batch steps on CIFAR-10, but only
5 x ceil(133/64) = 15 here, too few for any method to change the model. We match
the study's optimizer steps instead: unlearn_epochs = round(5 x 79 / 3) = 132,
i.e. 396 forget-batch steps for gradient ascent and two-stage (stage 2), and
132 epochs over the retain set (2,508 steps) for fine-tuning.

Expected (seed 42; 3,300 + 2,850 training and 3,301 unlearning steps; measured on
this project's 2-core CPU (AMD EPYC with AVX-512, jax 0.10.2, one CPU device): the
whole command ~90-130 s, 129 s with other jobs running; a rerun on the same workdir
reuses every stage and takes seconds):

| Model           | Forget Acc (train) | Retain Acc (test) | Entropy (F) | JSD to Gold | MIA-efficacy |
|-----------------|-------------------:|------------------:|------------:|------------:|-------------:|
| Original        | 100.00             | 96.30             | 0.0257      | 0.8278      | 0.00         |
| Gold (retrain)  | 0.00               | 95.06             | 0.3436      | 0.0000      | 100.00       |
| Fine-tuning     | 100.00             | 96.54             | 0.0259      | 0.8276      | 0.00         |
| Gradient Ascent | 100.00             | 96.05             | 0.0259      | 0.8276      | 0.00         |
| 2-Stage         | 0.00               | 62.22             | 1.8724      | 0.6879      | 100.00       |

As in the study, fine-tuning under-unlearns. Two-stage and gradient ascent are
bimodal across seeds (shared/digits-notes.md), and the mode hangs on float
rounding: other machines, device counts or versions of this code land the same
seed in the other mode (two-stage ~97% forget accuracy, entropy 1.70). One seed
says little: `--config.seeds=5` runs five and reports mean ± sd.
"""
from jaxunlearn.config import get_base_config


def get_config():
  c = get_base_config()
  c.data.name = "digits"
  c.model.vit.image_size = 8
  c.model.vit.patch_size = 2
  c.model.vit.hidden_size = 64
  c.model.vit.depth = 2
  c.model.vit.num_heads = 4
  c.model.vit.mlp_dim = 128
  c.train.learning_rate = 0.02
  c.train.epochs = 150
  # The study's three methods with its settings (lr 1e-4, momentum 0.9, no weight
  # decay), 5 epochs mapped to digits by optimizer steps (docstring).
  for m in ("finetune", "gradient_ascent", "two_stage"):
    c[m].learning_rate, c[m].weight_decay, c[m].epochs = 1e-4, 0.0, 132
  # 133 forget images in all: whole shuffled batches until >= 50 forget and
  # >= 300 retain images (~500 points per panel; t-SNE time grows with the count).
  c.tsne.num_forget = 50
  c.tsne.num_retain = 300
  return c
