"""Runs the study: `python -m jaxunlearn.main --config configs/digits.py --workdir /tmp/run`.

With `--config.tune.methods=...` (e.g. `configs/digits_tune.py`) it first tunes each
method against Gold on held-out data (`jaxunlearn/tune.py`), then runs the tuned methods.

Any config field can be overridden, e.g. `--config.forget_class=3 --config.seed=1
--config.methods=two_stage,finetune --config.salun.mask_fraction=0.3`.

Bad input stops the run before any work with one line on stderr, `error: ...`, and
exit status 2 (`EXIT_INPUT_ERROR`): a config file that is missing, raises or does not
parse; an unknown `--config.` field (the line names the closest valid ones); a value
of the wrong type or out of range (`config.validate` checks every field); a config too
large for this machine's memory (`sizes.check`); missing data or weights; an unwritable
workdir. Nothing is written to the workdir before the input is validated and the data
and weights are found. A failure of the disk or the workdir (full disk, damaged
checkpoint, lost lock) is one line too, with status 3 (`EXIT_ENVIRONMENT`); Ctrl-C
prints `interrupted; rerun the same command to resume` (status 130, SIGTERM 143).
Every status: `jaxunlearn/exits.py`. `--traceback` shows the traceback.
`--check_config` only validates the config; `--check_inputs` also loads the data and
builds the model, prints what would run and exits, writing nothing.
"""
import json
import os
import re
import sys

from absl import app, logging

from jaxunlearn import exits, lock
from jaxunlearn.cli import (EXIT_ENVIRONMENT, EXIT_INPUT_ERROR, FLAGS, RUN_ERRORS, InputError,
                            check, define_flags, exit_with, parse_flags, validated)

__all__ = ["EXIT_ENVIRONMENT", "EXIT_INPUT_ERROR", "InputError", "check", "main", "run"]


def _workdir_arg(argv) -> str | None:
  """The --workdir of a command line, before its flags are parsed (the last one given)."""
  found = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    m = re.fullmatch(r"--?workdir(=(.*))?", arg)
    if m:
      found = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return found


def finished_report(config, workdir: str) -> str | None:
  """The report of a workdir this process cannot write (a read-only file system) that
  holds this config's finished results, else None (the run goes on, and says why not)."""
  if os.access(workdir, os.W_OK) or not os.path.isdir(workdir) or config.tune.methods \
      or config.tuned:
    return None
  from jaxunlearn import report
  try:
    results, markdown = report.read(workdir)
  except (OSError, ValueError):
    return None
  return markdown if results.get("config") == json.loads(config.to_json()) else None


def main(argv):
  del argv  # parse_flags rejects positional arguments
  verbose = FLAGS["verbosity"].present
  if not verbose:
    # Orbax logs every save at INFO; progress bars and the table say what matters.
    logging.set_verbosity(logging.WARNING)
  if not (verbose or FLAGS.traceback):
    exits.quiet_echoes(logging.get_absl_handler())
  try:
    config, workdir = validated(FLAGS)
    from jaxunlearn import config as config_lib, sizes
    if FLAGS.check_config:
      print(f"config ok: methods {','.join(config_lib.method_names(config))}")
      return
    if FLAGS.check_inputs:
      from jaxunlearn import pipeline
      print(f"inputs ok: {pipeline.check_inputs(config)}")
      return
    report_text = finished_report(config, workdir)
    if report_text is not None:
      print(report_text, end="")
      return
    if not config.distributed:  # multi-host: after the cluster is joined (`pipeline`)
      sizes.check_before_loading(config)
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
  """The command line: flags defined, parsed and checked, then `main`.

  A busy workdir is refused first, before JAX is imported; Ctrl-C, SIGTERM and a lost
  workdir lock stop the run with one line (`exits`).
  """
  exits.on_signals()
  exits.watch_lock()
  try:
    workdir = _workdir_arg(sys.argv)
    if workdir:
      lock.refuse_if_busy(workdir)
    define_flags(FLAGS)
  except (InputError, ValueError) as e:
    exit_with(e)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
