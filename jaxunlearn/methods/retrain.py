"""Gold: retrain from the same start on the retain set only, with the Original's recipe.

What every method is measured against (the study's "Gold Standard"; "Retrain" in
Unlearn-Sparse and the other reference code).
"""
from jaxunlearn.methods import original

DISPLAY_NAME = "Gold (retrain)"
SECTION = "train"


def recipe(s):
  return original.recipe(s, pool="retain")
