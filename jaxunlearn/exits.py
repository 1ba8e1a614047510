"""How the command line ends: every expected failure is one `error:` line and a status.

  0    the run finished (or the report of a finished read-only workdir was printed)
  2    EXIT_INPUT_ERROR: fix the command (a field, a file it names, the workdir it picks)
  3    EXIT_ENVIRONMENT: the machine or the workdir failed, not the command (a full disk,
       a damaged checkpoint, a lost workdir lock); the line names the path and the fix
  130  EXIT_INTERRUPTED: Ctrl-C (SIGINT); 143 for SIGTERM: rerun the same command to resume

Once the line is printed the process ends with `os._exit`: orbax's background threads
and TensorStore's coroutines would otherwise print tracebacks at interpreter exit. That
is as safe as `kill -9`, which every run survives (README, "Reliability"). Only the
command line (`main.run`) installs any of this; the library raises and never exits.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from jaxunlearn.lock import FIXES, WorkdirError  # no JAX

EXIT_INPUT_ERROR = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130; SIGTERM gives 128 + 15 = 143

# Libraries whose log records and thread tracebacks are the echo of an error that reaches
# us as an exception (a failed orbax save), printed by their threads before our line.
_ECHOES = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}", f"{os.sep}asyncio{os.sep}")

_STOPPING = threading.Lock()
_OWNER: list[int] = []  # the thread reporting, once one is


def one_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def status(e: BaseException) -> int:
  """EXIT_ENVIRONMENT for the workdir's and the disk's failures, else EXIT_INPUT_ERROR."""
  if isinstance(e, WorkdirError) or (isinstance(e, OSError) and e.errno in FIXES):
    return EXIT_ENVIRONMENT
  return EXIT_INPUT_ERROR


def message(e: BaseException) -> str:
  """`e` as one line; an OSError with its path and, for the disk's errors, the fix."""
  if isinstance(e, OSError) and e.strerror:
    where = f": {e.filename}" if e.filename else ""
    fix = f"; {FIXES[e.errno]}" if e.errno in FIXES else ""
    return f"{e.strerror}{where}{fix}"
  return one_line(e)


def stop(line: str, code: int) -> None:
  """Prints `line` to stderr and ends the process at once with `code` (no teardown).

  The first caller wins: a signal or the lock watcher arriving while another error is
  reported waits for that report's exit instead of printing a second line.
  """
  if not _STOPPING.acquire(blocking=False):
    if threading.get_ident() in _OWNER:
      return  # a signal arrived while this thread reports: its exit comes next
    _STOPPING.acquire(timeout=10)  # another thread reports and exits the process
  _OWNER.append(threading.get_ident())
  logging.disable(logging.CRITICAL)  # nothing more from any library's logger
  try:
    sys.stdout.flush()
  finally:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(code)


def fail(e: BaseException) -> None:
  """Stops with `e`'s one line; a lost workdir lock explains a write that failed with it
  (a deleted workdir fails writes before `rm -r` reaches the lock file: given a second)."""
  from jaxunlearn import lock
  waits = 10 if status(e) == EXIT_ENVIRONMENT else 0
  for _ in range(waits + 1):
    lost = lock.lost()
    if lost:
      stop(f"error: {lost}", EXIT_ENVIRONMENT)
    if waits:
      time.sleep(0.1)
  stop(f"error: {message(e)}  (--traceback for details)", status(e))


def _on_signal(signum, frame):
  del frame
  stop("interrupted; rerun the same command to resume", 128 + signum)


def on_signals() -> None:
  """Ctrl-C and SIGTERM stop the run with one line (a SIGINT ignored by the shell stays so)."""
  if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, _on_signal)
  signal.signal(signal.SIGTERM, _on_signal)


class _DropEchoes(logging.Filter):
  def filter(self, record):
    return not any(part in record.pathname for part in _ECHOES)


def _echo(value) -> bool:
  """TensorStore's callback into the event loop of an orbax save that already failed."""
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _unraisablehook(hook):
  """sys.unraisablehook minus TensorStore's echoes (it reports them from its threads)."""
  def quiet(unraisable):
    if not _echo(unraisable.exc_value):
      hook(unraisable)
  return quiet


def quiet_echoes(handler: logging.Handler) -> None:
  """Drops orbax's, TensorStore's and asyncio's log records on `handler`, and
  TensorStore's thread tracebacks: a failed save reaches the run as an exception,
  which becomes the one line. `--verbosity` or `--traceback` keep them."""
  handler.addFilter(_DropEchoes())
  sys.unraisablehook = _unraisablehook(sys.unraisablehook)


def watch_lock(every_seconds: float = 1.0) -> None:
  """A daemon thread that stops the run once a workdir lock this process holds is lost."""
  from jaxunlearn import lock

  def watch():
    while not threading.Event().wait(every_seconds):
      lost = lock.lost()
      if lost:
        stop(f"error: {lost}", EXIT_ENVIRONMENT)
  threading.Thread(target=watch, name="workdir-lock-watch", daemon=True).start()
