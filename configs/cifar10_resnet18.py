"""The field's benchmark: ResNet-18 from scratch on CIFAR-10, every method at its reference's settings.

  pip install -e '.[cuda12]'                                        # on a GPU machine
  pip install -e '.[prepare]' && python -m jaxunlearn.tfds_data     # once: CIFAR-10
  python -m jaxunlearn.main --config configs/cifar10_resnet18.py --workdir runs/c10-r18-class
  python -m jaxunlearn.main --config configs/cifar10_resnet18.py --workdir runs/c10-r18-random \\
      --config.scenario=random --config.forget_fraction=0.1

Model: the CIFAR ResNet-18 of OPTML-Group/Unlearn-Sparse `models/ResNet.py`
(`resnet18(imagenet=False)`; 11,173,962 parameters), BatchNorm as PyTorch's.
Original and Gold: Unlearn-Sparse `arg_parser.py` defaults, SGD lr 0.1, momentum
0.9, weight decay 5e-4, batch 256, 182 epochs, x0.1 at epochs 91 and 136. (The
references retrain Gold for 160 epochs; here Gold uses the Original's recipe.)
Methods: every one at its reference's ResNet-18 / CIFAR-10 setting (see each
jaxunlearn/methods/<name>.py), per-stream batch sizes included: SCRUB forget 512 /
retain 256, DELETE 128, SSD importance batches 64 with alpha 10 (its ResNet
value), FCS 256; the study's two-stage keeps its own values.

Data as the references: 45,000 training images (`data.hold_out` 0.1 leaves a
stratified 5,000 out, as Unlearn-Sparse `dataset.py` keeps 500 per class for
validation: other images than its seeded pick), so random 10% forgetting forgets
4,500 (its `--num_indexes_to_replace 4500`); random crop (4-pixel zero padding) and horizontal flip
while training (Unlearn-Sparse `dataset.py`; which stages augment: each method's
docstring) and CIFAR-10's mean/std normalisation (Unlearn-Sparse `models/ResNet.py`).
Run time on one GPU: not measured yet
(no GPU has been lent to this project; `scripts/gpu_check.sh` times a ResNet-18
epoch and every method's step when one is). The references report 43 minutes
for Retrain on their GPU (SalUn Table 1, RTE).

The published numbers it should reproduce (CIFAR-10, ResNet-18; UA = 100 - forget
train accuracy, RA = retain train accuracy, TA = test accuracy, MIA = MIA-efficacy;
mean over trials). Random 10% forgetting, SalUn (Fan et al., ICLR 2024) Table 1
(the authors' copy: OPTML-Group/OPTML-Group.github.io
`images/postpic/salun_iclr24/tab1.png`, produced by OPTML-Group/Unlearn-Saliency
`Classification/main_random.py`; 10 trials):

| Method    | UA    | RA     | TA    | MIA   | Avg. Gap |
|-----------|------:|-------:|------:|------:|---------:|
| Retrain   | 5.24  | 100.00 | 94.26 | 12.88 | 0.00     |
| FT        | 0.63  | 99.88  | 94.06 | 2.70  | 3.78     |
| RL        | 7.61  | 99.67  | 92.83 | 37.36 | 7.15     |
| GA        | 0.69  | 99.50  | 94.01 | 1.70  | 4.12     |
| BS        | 1.78  | 98.29  | 92.69 | 8.96  | 2.67     |
| l1-sparse | 4.19  | 97.74  | 91.59 | 9.84  | 2.26     |
| SalUn     | 2.85  | 99.62  | 93.93 | 14.39 | 1.15     |

Class-wise forgetting, Unlearn-Sparse (Jia et al., NeurIPS 2023) Table 1, dense
model (the authors' copy: `images/postpic/Sparse_unlearn_neurips23/main_table.png`,
produced by OPTML-Group/Unlearn-Sparse `main_forget.py`):

| Method  | UA     | MIA    | RA     | TA    |
|---------|-------:|-------:|-------:|------:|
| Retrain | 100.00 | 100.00 | 100.00 | 94.83 |
| FT      | 22.53  | 75.00  | 99.87  | 94.31 |
| GA      | 93.08  | 94.03  | 92.60  | 86.64 |

Our numbers: not run yet (needs a GPU and the data set); the README's
"Reproducing the field's tables" will hold them next to these.
"""
from jaxunlearn.config import get_base_config


def get_config():
  c = get_base_config()
  c.data.name = "cifar10"
  c.data.augment = "crop_flip"
  c.data.mean = "0.4914,0.4822,0.4465"
  c.data.std = "0.2470,0.2435,0.2616"
  c.data.hold_out = 0.1  # 45,000 training images, as the references (their validation 5,000)
  c.model.name = "resnet18"
  c.model.resnet.width = 64
  c.batch_size = 256
  c.train.update(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, epochs=182,
                 schedule="step", decay_epochs="91,136", decay_factor=0.1)
  c.methods = "all"
  # Reference batch sizes per stream (each method's section; 0 = config.batch_size).
  c.scrub.forget_batch_size = 512
  c.delete.batch_size = 128
  c.ssd.batch_size = 64
  c.ssd.alpha = 10.0  # SSD's ResNet-18 setting (its ViT one is 5)
  # The study's two-stage: its own settings (lr 1e-4, batch 64 as the study).
  c.two_stage.batch_size = 64
  c.eval.batch_size = 1024
  c.tsne.num_forget = c.tsne.num_retain = 300
  return c
