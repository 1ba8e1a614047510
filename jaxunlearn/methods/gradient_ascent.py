"""Gradient ascent: maximise the cross-entropy on the forget set, nothing else."""
from jaxunlearn import objectives, train

DISPLAY_NAME = "Gradient Ascent"


def phases(config):
  # Minus the cross-entropy, minimised: the step CE training compiled, run with sign -1.
  return [train.Phase("gradient_ascent", objectives.cross_entropy,
                      {"data": train.Stream("forget", epochs=config.unlearn_epochs)}, sign=-1.0)]
