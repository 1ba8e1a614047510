"""SSD's sub-class benchmark: ResNet-18 on CIFAR-20 (CIFAR-100's 20 coarse labels), one
fine class forgotten inside its coarse class.

  pip install -e '.[prepare]' && python -m jaxunlearn.tfds_data --name cifar100   # once
  for s in rocket mushroom baby lamp sea; do       # SSD's sub-classes
    python -m jaxunlearn.main --config configs/cifar20_subclass_resnet18.py \\
        --workdir runs/c20-r18-sub-$s --config.forget_subclass=$s --config.seeds=5
  done

The setting of SSD (Foster et al., AAAI 2024, arXiv 2308.07707), produced by
if-loops/selective-synaptic-dampening `src/cifar20_subclass_exps.sh`
(-> `src/forget_subclass_main.py`; commit cdfdc0e): train on the 20 coarse labels,
forget every training example of one fine class (rocket inside vehicles_2, ...).
Metrics (README, "Sub-class forgetting"): the fine class's examples judged by their
coarse label; retain and test accuracy without them.

Everything as `cifar100_resnet18.py` (model, optimiser, augmentation, methods and the
differences from SSD listed there) except SSD's CIFAR-20 schedule: 40 epochs, x0.2 at
epochs 15, 30 and 35 (`src/conf.py`). Published numbers: SSD's ResNet-18 CIFAR-20
sub-class table, not copied here for the reason given in `cifar100_resnet18.py`.
Run time on one GPU: not measured yet.
"""
import os

from jaxunlearn import config


def get_config():
  c = config.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "cifar100_resnet18.py"))
  c.data.label = "coarse"
  c.scenario = "subclass"
  c.forget_subclass = "rocket"
  c.train.update(epochs=40, decay_epochs="15,30,35")
  return c
