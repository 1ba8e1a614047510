"""The command line's parsing and checking: every bad input is one `InputError` line.

`main.py` runs it; `check(argv)` does the same parse and validation in-process
(tests, notebooks). The config module (and with it JAX) is imported when a config file
is read, so `main.run` can refuse a busy workdir before that (`lock.refuse_if_busy`).
"""
import importlib.machinery
import os
import re
import traceback
import types

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxunlearn import exits
from jaxunlearn.exits import EXIT_ENVIRONMENT, EXIT_INPUT_ERROR  # noqa: F401  (re-exported)

# Errors from the run that mean bad input (data or weights missing or unreadable, an
# unwritable workdir, training that diverged at the chosen learning rate): also one line.
RUN_ERRORS = (ValueError, FloatingPointError, OSError, RuntimeError)


class InputError(Exception):
  """Bad input, reported as one line (`error: <message>`) and EXIT_INPUT_ERROR."""


def _shown(text: str) -> str:
  """`text` as one printable line (a name from the command line may hold anything)."""
  return text if text.isprintable() else text.encode("unicode_escape").decode()


_one_line = exits.one_line


class _ConfigFile(flags.ArgumentParser):
  """`--config path[:arg]`: the file's get_config([arg]), locked; each failure one InputError.

  ml_collections' own parser defers a missing file to the first use of the config and
  wraps other failures in multi-line tracebacks; this one fails at once, in one line.
  """
  fields = None  # {name: type} of the last config's fields, as loaded (before any override)

  def parse(self, argument):
    path, *arg = argument.split(":", 1)
    shown = _shown(path)
    if not os.path.isfile(path):
      what = "is a folder, not a file" if os.path.isdir(path) else "no such file"
      raise InputError(f"--config: {what}: {shown}")
    loader = importlib.machinery.SourceFileLoader("jaxunlearn_experiment_config", path)
    module = types.ModuleType(loader.name)
    module.__file__ = path
    try:
      loader.exec_module(module)
      config = module.get_config(*arg) if hasattr(module, "get_config") else None
    except SystemExit as e:  # sys.exit() in the file: its status alone would say nothing
      raise InputError(f"--config: {shown} called sys.exit({e.code!r}) while loading") from None
    except SyntaxError as e:
      raise InputError(f"--config: {shown}, line {e.lineno}: SyntaxError: {e.msg}") from e
    except Exception as e:  # anything the file's code raises
      lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
               if os.path.abspath(f.filename) == os.path.abspath(path)]
      where = f", line {lines[-1]}" if lines else ""
      raise InputError(f"--config: {shown}{where}: {type(e).__name__}: {_one_line(e)}") from e
    if not hasattr(module, "get_config"):
      raise InputError(f"--config: {shown} defines no get_config()")
    if not isinstance(config, ml_collections.ConfigDict):
      raise InputError(f"--config: get_config() in {shown} returned {type(config).__name__}, "
                       "not a ConfigDict")
    config.lock()  # an override of a field it lacks then fails
    from jaxunlearn import config as config_lib  # JAX: only once a config file is read
    self.fields = {f: type(config_lib.field_value(config, f))
                   for f in config_lib.field_names(config)}
    return config

  def flag_type(self):
    return "config object"


def define_flags(flag_values: flags.FlagValues, argv=None) -> None:
  """This program's flags on `flag_values`; --config's overrides are read from `argv` (sys.argv)."""
  try:  # ml_collections reads argv (and any --flagfile) here already
    config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
  except flags.Error as e:
    raise InputError(_one_line(e)) from e
  flag_values["config"].parser = _ConfigFile()
  flags.DEFINE_string("workdir", None, "Folder for checkpoints and results.",
                      flag_values=flag_values)
  flags.DEFINE_bool("traceback", False, "Show the full traceback of input errors.",
                    flag_values=flag_values)
  flags.DEFINE_bool("check_config", False,
                    "Only parse and validate the config (and its overrides), then exit.",
                    flag_values=flag_values)
  flags.DEFINE_bool("check_inputs", False,
                    "Validate the config, then load the data and check the scenario, the "
                    "model and its weights against it; print what would run and exit. "
                    "Nothing is written.", flag_values=flag_values)


FLAGS = flags.FLAGS


def _overrides(argv) -> dict[str, str | None]:
  """{field: value} of each `--config.<field>[=value]` in argv (the last of each; None: no `=`)."""
  out = {}
  for arg in argv[1:]:
    if arg == "--":
      break
    # As ml_collections finds them (config_flags._ConfigFlag._GetOverrides).
    if re.match(r"-{1,2}(no)?config\.", arg):
      name, eq, value = arg.partition("=")
      name = name.split(".", 1)[1]
      out.pop(name, None)
      out[name] = value if eq else None
  return out


def _check_names(fields, overrides) -> None:
  """Each override names one of `fields` (the config file's), not a section: else one InputError."""
  for name in overrides:
    if name in fields:
      continue
    from jaxunlearn import config as config_lib
    inside = [f for f in fields if f.startswith(name + ".")]
    if inside:
      raise InputError(f"--config.{name} is a section; set its fields, e.g. "
                       f"--config.{inside[0]}=...")
    near = config_lib.closest(name, fields)
    raise InputError(f"--config.{_shown(name)}: no such field; closest: "
                     f"{', '.join('--config.' + n for n in near)}")


_KINDS = {bool: "true or false", int: "an integer", float: "a number"}


def _flag_message(e: Exception, fields, overrides) -> str:
  """absl's and ml_collections' parse errors, as one line that names the flag."""
  message = _one_line(e)
  for name, value in overrides.items():
    if fields and message.startswith(f"flag --config.{name}="):
      kind = _KINDS.get(fields.get(name))
      if kind:
        got = "" if value is None else f", got {value!r}"
        return f"--config.{name}: must be {kind}{got}"
  return message


def _parse(flag_values: flags.FlagValues, argv) -> list[str]:
  """Parses argv into `flag_values` (the config file and its overrides); errors as InputError."""
  parser = flag_values["config"].parser
  parser.fields = None
  error = None
  try:
    rest = flag_values(argv)
  except InputError:
    raise
  except Exception as e:  # every way absl and ml_collections reject a command line
    error = e
  try:  # overrides may come from a --flagfile
    overrides = _overrides(argv[:1] + flag_values.read_flags_from_files(argv[1:], force_gnu=False))
  except flags.Error:
    overrides = _overrides(argv)
  if parser.fields is not None:
    _check_names(parser.fields, overrides)
  if error is not None:
    raise InputError(_flag_message(error, parser.fields, overrides)) from error
  if len(rest) > 1:
    raise InputError(f"unexpected arguments: {' '.join(rest[1:])!r}")
  return rest


def validated(flag_values: flags.FlagValues):
  """(config, workdir) of parsed flags, the config validated; else an InputError."""
  if flag_values.config is None:
    raise InputError("--config is required: an experiment file, e.g. --config configs/digits.py")
  if not flag_values.workdir:
    raise InputError("--workdir is required: the folder for checkpoints and results")
  from jaxunlearn import config as config_lib
  try:
    config_lib.validate(flag_values.config)
  except ValueError as e:
    raise InputError(_one_line(e)) from e
  return flag_values.config, flag_values.workdir


def check(argv):
  """Parses and validates a command line (program name first) as the CLI does, without running.

  Returns (config, workdir); raises InputError with a one-line message on bad input.
  Only this program's flags are known here (absl's own, like --verbosity, are not).
  """
  flag_values = flags.FlagValues()
  define_flags(flag_values, argv)
  _parse(flag_values, argv)
  return validated(flag_values)


def exit_with(e: BaseException):
  """Ends the process with `e`'s one line and its status (`exits.fail`)."""
  exits.fail(e)


def parse_flags(argv):
  """app.run's flags parser: a bad command line is one line, not absl's usage text."""
  try:
    return _parse(FLAGS, argv)
  except InputError as e:
    if "--traceback" in argv:
      raise
    exit_with(e)
