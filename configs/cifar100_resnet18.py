"""SSD's class-wise benchmark: ResNet-18 from scratch on CIFAR-100, forgetting one class.

  pip install -e '.[cuda12]'                                        # on a GPU machine
  pip install -e '.[prepare]' && python -m jaxunlearn.tfds_data --name cifar100   # once
  for k in 69 51 2 40 71; do     # rocket, mushroom, baby, lamp, sea (SSD's classes)
    python -m jaxunlearn.main --config configs/cifar100_resnet18.py \\
        --workdir runs/c100-r18-class-$k --config.forget_class=$k --config.seeds=5
  done

The setting of Foster et al., "Fast Machine Unlearning Without Retraining Through
Selective Synaptic Dampening" (SSD, AAAI 2024, arXiv 2308.07707), produced by
if-loops/selective-synaptic-dampening `src/cifar100_fullclass_exps.sh`
(-> `src/forget_full_class_main.py`; commit cdfdc0e), the classes of its
`src/conf.py` (`cifar100_classes`, numbered as TFDS's fine labels: rocket 69,
mushroom 51, baby 2, lamp 40, sea 71).

Model: our CIFAR ResNet-18 (the structure of SSD's `src/resnet.py`, from
weiaicunzai/pytorch-cifar100: 3x3 stem, no max-pool, BasicBlocks 2-2-2-2 with
1x1-conv shortcuts; SSD keeps PyTorch's default initialisation, we use
Kaiming-normal as Unlearn-Sparse). Original and Gold: SSD's `src/pretrain_model.py`,
SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 64, one epoch of linear warm-up,
200 epochs, x0.2 at epochs 60, 120 and 160 (`src/conf.py`); CIFAR-100's mean/std
and random crop + flip (SSD's `src/datasets.py`).

Where this differs from SSD's runs, on purpose or not yet:
- SSD's training transform also rotates by up to 15 degrees; we crop and flip only.
- SSD keeps the Original checkpoint with the best *test* accuracy; we keep the last
  (selecting on the test set leaks it into the model).
- SSD's "retrain" re-initialises only the model's direct children and trains with a
  one-cycle lr 0.01 (its issue #1: in effect only the head is reset); our Gold is a
  full retraining from scratch with the Original's recipe, as the other references.
- SSD's unlearning stages read unaugmented images (`transform_unlearning`); ours
  augment where Unlearn-Sparse's do (each method's docstring; SSD itself never does).
- Fine-tuning at SSD's setting: 5 epochs on the retain set, lr 0.02.

SSD reports accuracy on the retain and forget *test* splits (our Retain Acc (test)
and Forget Acc (test)) and its MIA. Published numbers: the ResNet-18 CIFAR-100
full-class table of the SSD paper. They are not copied here: the paper's tables
could not be read from this project's machines (no network) and we do not quote
numbers we have not read; the README's "Reproducing the field's tables" has the row
for them. Run time on one GPU: not measured yet (no GPU lent to this project).
"""
from jaxunlearn.config import get_base_config

# CIFAR-100's mean and std per channel, as SSD's src/datasets.py (CIFAR_MEAN, CIFAR_STD).
MEAN, STD = "0.5071,0.4865,0.4409", "0.2673,0.2564,0.2762"


def get_config():
  c = get_base_config()
  c.data.name = "cifar100"
  c.data.augment = "crop_flip"
  c.data.mean, c.data.std = MEAN, STD
  c.forget_class = "69"  # rocket
  c.model.name = "resnet18"
  c.model.resnet.width = 64
  c.batch_size = 64
  c.train.update(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, epochs=200,
                 schedule="step", decay_epochs="60,120,160", decay_factor=0.2, warmup_epochs=1)
  c.methods = "finetune,random_labels,ssd"
  c.finetune.update(epochs=5, learning_rate=0.02)
  c.ssd.update(alpha=10.0, dampening=1.0, batch_size=64)  # SSD's ResNet-18 setting
  c.eval.batch_size = 1024
  c.tsne.num_forget = c.tsne.num_retain = 300
  return c
