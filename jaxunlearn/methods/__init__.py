"""Unlearning methods. Each module states only what is particular to it: the
phases (objective + data streams) that the shared loop in `train.py` runs,
starting from a copy of the Original model."""
from jaxunlearn.methods import finetune, gradient_ascent, two_stage

# config name -> module with `phases(config) -> list[train.Phase]` and `DISPLAY_NAME`.
METHODS = {
    "finetune": finetune,
    "gradient_ascent": gradient_ascent,
    "two_stage": two_stage,
}
