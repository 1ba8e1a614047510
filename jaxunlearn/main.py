"""Runs the study: `python -m jaxunlearn.main --config configs/digits.py --workdir /tmp/run`.

Any config field can be overridden, e.g. `--config.forget_class=3 --config.seed=1
--config.methods=two_stage,finetune --config.salun.mask_fraction=0.3`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from jaxunlearn import config as config_lib, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and results.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of input errors.")
_CHECK = flags.DEFINE_bool("check_config", False,
                           "Only parse and validate the config (and its overrides), then exit.")

# Errors that mean bad input (config, workdir, data, weights): one line, no traceback.
# FileNotFoundError and other OSErrors come from missing weights or data folders.
_INPUT_ERRORS = (ValueError, FloatingPointError, OSError, RuntimeError)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; progress bars and the table say what matters.
    logging.set_verbosity(logging.WARNING)
  try:
    if _CHECK.value:
      config_lib.validate(_CONFIG.value)
      print(f"config ok: methods {','.join(config_lib.method_names(_CONFIG.value))}")
      return
    pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except _INPUT_ERRORS as e:
    if _TRACEBACK.value:
      raise
    raise SystemExit(f"error: {str(e).splitlines()[0]}  (--traceback for details)") from None


if __name__ == "__main__":
  app.run(main)
