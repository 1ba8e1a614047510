"""Retain-only fine-tuning: cross-entropy on the retain set."""
from jaxunlearn import objectives, train

DISPLAY_NAME = "Fine-tuning"


def phases(config):
  return [train.Phase("finetune", objectives.cross_entropy,
                      {"data": train.Stream("retain", epochs=config.unlearn_epochs)})]
