"""The pipeline's task scheduler: tasks with dependencies on a pool of worker threads.

The study is a graph of tasks (training stages, then each model's evaluation and
t-SNE); `run_tasks` starts each as soon as its dependencies are done, highest
priority first, on as many threads as there are workers.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
from typing import Any, Callable


class BarSlots:
  """Progress-bar lines for stages running at once: each takes the lowest free line."""

  def __init__(self):
    self._lock, self._used = threading.Lock(), set()

  @contextlib.contextmanager
  def take(self):
    with self._lock:
      slot = min(set(range(len(self._used) + 1)) - self._used)
      self._used.add(slot)
    try:
      yield slot
    finally:
      with self._lock:
        self._used.discard(slot)


@dataclasses.dataclass(frozen=True)
class Task:
  """One step of the pipeline: `fn(results, idle)` once every task in `deps` is done.

  `results` maps finished tasks to their values; `idle` is how many workers had
  nothing to do when the task started.
  """
  fn: Callable[[dict, int], Any]
  deps: tuple[str, ...] = ()
  priority: float = 0.0  # among ready tasks, the highest starts first


def run_tasks(tasks: dict[str, Task], workers: int, cancel: threading.Event) -> dict:
  """Runs `tasks` on `workers` threads, each as soon as its deps are done (list scheduling).

  Returns {name: value}. On a failure or Ctrl-C, `cancel` is set, so running
  training stages stop at their next chunk, and the first error is re-raised once
  the running tasks have returned; finished stages keep their checkpoints.
  """
  results, waiting, running = {}, dict(tasks), {}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    try:
      while waiting or running:
        ready = [n for n, t in waiting.items() if all(d in results for d in t.deps)]
        ready.sort(key=lambda n: -waiting[n].priority)  # stable: ties keep their order
        for name in ready[:workers - len(running)]:
          idle = workers - len(running) - 1
          running[pool.submit(waiting.pop(name).fn, dict(results), idle)] = name
        if not running:
          raise ValueError(f"tasks {sorted(waiting)} wait on tasks that do not exist")
        done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
          results[running.pop(f)] = f.result()  # re-raises a task's error
    except BaseException:
      cancel.set()
      raise
  return results
