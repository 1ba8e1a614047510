"""Compiled programs by signature, with the time spent compiling kept apart from the run time.

`CompileCache()(jitted, static, *args)` lowers and compiles `jitted(*static,
*args)` once per `key` (the function, its static arguments, and the structure,
shapes and dtypes of the rest) and runs the compiled program. Each thread has
its own compile-time clock (`seconds()`), so stages running in parallel threads
each report their own compile time; waiting for another thread's compile of the
same program counts as compile time.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def key(jitted, static: tuple, args: tuple) -> tuple:
  """The signature a compiled program is kept under."""
  leaves, treedef = jax.tree.flatten(args)
  return (jitted, static, treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))


class CompileCache:

  def __init__(self):
    self._compiled: dict[Any, Any] = {}
    self._lock = threading.Lock()
    self._locks: dict[Any, threading.Lock] = {}
    self._local = threading.local()

  def __call__(self, jitted, static: tuple, *args):
    k = key(jitted, static, args)
    if k not in self._compiled:
      t0 = time.perf_counter()
      with self._lock:
        lock = self._locks.setdefault(k, threading.Lock())
      with lock:
        if k not in self._compiled:
          self._compiled[k] = jitted.lower(*static, *args).compile()
      self._local.seconds = self.seconds() + time.perf_counter() - t0
    return self._compiled[k](*args)

  def __contains__(self, k) -> bool:
    return k in self._compiled

  def seconds(self) -> float:
    """Seconds this thread has spent compiling (callers read its change)."""
    return getattr(self._local, "seconds", 0.0)
