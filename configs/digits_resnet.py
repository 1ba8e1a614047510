"""The study on scikit-learn's digits with a small ResNet-18 (BatchNorm): offline, on a 2-core CPU.

  python -m jaxunlearn.main --config configs/digits_resnet.py --workdir /tmp/digits_resnet

The digits default (`digits.py`: data, forget class 0, the study's three methods
at its lr 1e-4, momentum 0.9, batch 64) with the field's architecture instead of
the ViT: the CIFAR ResNet-18 of the references (3x3 stem, no max-pool,
BasicBlocks 2-2-2-2, BatchNorm) at width 8 instead of 64 (8-16-32-64 channels,
~176k parameters) so that it trains in seconds per epoch on the CPU. Images stay
8x8 (no resize); the stages halve them to 1x1. Original and Gold: SGD lr 0.05,
momentum 0.9, weight decay 5e-4, 15 epochs, x0.1 at epoch 10 (the references'
step decay, scaled down), from the same seeded initialisation.

Expected run time and numbers: see the README ("ResNet-18").
"""
import os

from jaxunlearn import config


def get_config():
  c = config.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
  c.model.name = "resnet18"
  c.model.resnet.width = 8
  c.train.update(learning_rate=0.05, weight_decay=5e-4, epochs=15, schedule="step",
                 decay_epochs="10")
  return c
