"""The workdir's lock: one run per workdir, a busy one refused at once, a lost one noticed.

The lock is `fcntl.flock` on `<workdir>/.lock`: the OS releases it when its process
ends, however it ends, so a killed run never blocks the next one. A lock file that is
deleted (or replaced, or its workdir deleted) while a run holds it no longer keeps a
second run out, so the holder checks that the path still names the file it locked
(`lost`) and stops.

No JAX here: the command line refuses a busy workdir (`refuse_if_busy`) before it
spends seconds importing JAX and loading data.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading

LOCK_FILE = ".lock"

# The locks this process holds: lock path -> (fd, (st_dev, st_ino) of the file it locked).
_HELD: dict[str, tuple[int, tuple[int, int]]] = {}
_MUTEX = threading.Lock()


# OSErrors of the disk rather than the command, and the fix a one-line error ends with.
FIXES = {errno.ENOSPC: "free space on that disk, then rerun the same command to resume",
         errno.EDQUOT: "free space in your disk quota, then rerun the same command to resume",
         errno.EIO: "the disk reported an I/O error; check it, then rerun the same command",
         errno.EROFS: "use a writable --workdir (a finished run's report prints without writing)"}


class WorkdirError(ValueError):
  """The workdir or its disk failed, not the command: a full disk, a damaged file, a lost
  lock. One line naming the path and the fix; the CLI exits with EXIT_ENVIRONMENT."""


def path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def _busy(workdir: str, fd: int) -> ValueError:
  holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
  return ValueError(f"--workdir {workdir!r} is in use by {holder}; wait for it to finish, "
                    "or use another --workdir")


def _open(workdir: str, flags: int) -> int:
  try:
    return os.open(path(workdir), flags, 0o644)
  except IsADirectoryError:
    raise WorkdirError(f"{path(workdir)} is a folder, not a lock file; remove it "
                       f"(rm -r {path(workdir)!r}) and rerun") from None
  except OSError as e:
    raise WorkdirError(f"cannot open the lock file {path(workdir)} ({e.strerror}); check "
                       "that the workdir is writable, then rerun") from None


def acquire(workdir: str) -> None:
  """Locks `workdir` for this process (it exists); a workdir in use raises one-line ValueError."""
  fd = _open(workdir, os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    error = _busy(workdir, fd) if e.errno in (errno.EWOULDBLOCK, errno.EACCES) else WorkdirError(
        f"cannot lock {path(workdir)} ({e.strerror}); use a workdir on a local disk")
    os.close(fd)
    raise error from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
  stat = os.fstat(fd)
  with _MUTEX:
    _HELD[path(workdir)] = fd, (stat.st_dev, stat.st_ino)


def release(workdir: str) -> None:
  with _MUTEX:
    fd, _ = _HELD.pop(path(workdir), (None, None))
  if fd is not None:
    os.close(fd)  # releases the lock


def refuse_if_busy(workdir: str) -> None:
  """Raises acquire's one-line ValueError when another process holds `workdir`'s lock.

  Writes nothing (an absent lock file means a free workdir) and keeps nothing locked:
  the run claims the workdir itself once its input is checked.
  """
  if path(workdir) in _HELD or not os.path.isfile(path(workdir)):
    return
  try:
    fd = os.open(path(workdir), os.O_RDONLY)
  except OSError:
    return  # the claim says what is wrong with it
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError:
    raise _busy(workdir, fd) from None
  finally:
    os.close(fd)  # also releases the shared lock


def lost() -> str | None:
  """The one-line message of a held lock whose file is gone or replaced, else None."""
  with _MUTEX:
    held = dict(_HELD)
  for lock_path, (_, identity) in held.items():
    try:
      stat = os.stat(lock_path)
      if (stat.st_dev, stat.st_ino) == identity:
        continue
    except OSError:
      pass
    return (f"{lock_path} was deleted or replaced while this run held it (was the workdir "
            "deleted?): another run may be writing there, so this one stopped; check the "
            "workdir, then rerun the same command to resume")
  return None


def check() -> None:
  """Raises WorkdirError when a lock this process holds was lost (`lost`)."""
  message = lost()
  if message:
    raise WorkdirError(message)
