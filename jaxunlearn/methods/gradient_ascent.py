"""Gradient ascent: maximise the cross-entropy on the forget set, nothing else."""
from jaxunlearn import objectives, train

DISPLAY_NAME = "Gradient Ascent"


def phases(config):
  return [train.Phase("gradient_ascent", objectives.negated_cross_entropy,
                      {"data": train.Stream("forget", epochs=config.unlearn_epochs)})]
