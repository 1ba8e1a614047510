"""Runs the study: `python -m jaxunlearn.main --config configs/digits.py --workdir /tmp/run`.

With `--config.tune.methods=...` (e.g. `configs/digits_tune.py`) it first tunes each
method against Gold on held-out data (`jaxunlearn/tune.py`), then runs the tuned methods.

Any config field can be overridden, e.g. `--config.forget_class=3 --config.seed=1
--config.methods=two_stage,finetune --config.salun.mask_fraction=0.3`.

Bad input stops the run before any work with one line on stderr, `error: ...`, and
exit status 2 (`EXIT_INPUT_ERROR`): a config file that is missing, raises or does not
parse; an unknown `--config.` field (the line names the closest valid ones); a value
of the wrong type or out of range (`config.validate` checks every field); missing data
or weights; an unwritable workdir. Nothing is written to the workdir before the input
is validated and the data and weights are found. `--traceback` shows the traceback.
"""

from absl import app, logging

from jaxunlearn import config as config_lib
from jaxunlearn.cli import (EXIT_INPUT_ERROR, FLAGS, RUN_ERRORS, InputError, check,
                            define_flags, exit_with, parse_flags, validated)

__all__ = ["EXIT_INPUT_ERROR", "InputError", "check", "main", "run"]


def main(argv):
  del argv  # parse_flags rejects positional arguments
  if not FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; progress bars and the table say what matters.
    logging.set_verbosity(logging.WARNING)
  try:
    config, workdir = validated(FLAGS)
    if FLAGS.check_config:
      print(f"config ok: methods {','.join(config_lib.method_names(config))}")
      return
    if config.tune.methods:  # tune each method first, then the tuned comparison
      from jaxunlearn import tune
      tune.run(config, workdir)
      return
    from jaxunlearn import pipeline  # after validation: bad input is reported sooner
    pipeline.train_and_evaluate(config, workdir)
  except (InputError, *RUN_ERRORS) as e:
    if FLAGS.traceback:
      raise
    exit_with(e)


def run():
  """The command line: flags defined, parsed and checked, then `main`."""
  try:
    define_flags(FLAGS)
  except InputError as e:
    exit_with(e)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
