"""Stages: Original and Gold (retrain), and the unlearning methods.

Each module states only what is particular to it (see `base.py`): the phases
that the shared loop in `train.py` runs, a prepare sweep or a final edit where
the method has one, and its config section with the reference's defaults.
Every unlearning method starts from a copy of the Original.
"""
from jaxunlearn.methods import (boundary_shrinking, delete, fcs, finetune, gradient_ascent,
                                l1_sparse, neggrad_plus, original, random_labels, retrain, salun,
                                scrub, ssd, ssd_det, two_stage)

# config name -> module (DISPLAY_NAME, get_config(), recipe(section), [validate(c, name)]).
METHODS = {
    "finetune": finetune,
    "gradient_ascent": gradient_ascent,
    "two_stage": two_stage,
    "random_labels": random_labels,
    "salun": salun,
    "l1_sparse": l1_sparse,
    "neggrad_plus": neggrad_plus,
    "scrub": scrub,
    "boundary_shrinking": boundary_shrinking,
    "ssd": ssd,
    "ssd_det": ssd_det,
    "delete": delete,
    "fcs": fcs,
}

# The models every run trains from the start: what the methods begin from and aim at.
TRAINING = {"original": original, "retrain": retrain}


def section_name(name: str) -> str:
  """The config section a stage reads."""
  return getattr({**METHODS, **TRAINING}[name], "SECTION", name)
