"""Timing calls, shared by the JAX and PyTorch sides of the benchmark (no JAX or torch here).

A "call" runs one or more steps; `sync` waits for its result (jax.block_until_ready,
torch.cuda.synchronize), so the time covers the work and not only its dispatch.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def time_calls(call: Callable[[], Any], num_calls: int, sync: Callable[[Any], Any]) -> list[float]:
  """Seconds of each of `num_calls` calls, each waited for."""
  times = []
  for _ in range(num_calls):
    t0 = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - t0)
  return times


def rates(call_times_s: list[float], steps_per_call: int, examples_per_step: float) -> dict:
  """ms per step and examples per second of the median call."""
  step_s = statistics.median(call_times_s) / steps_per_call
  # The minimum too: on a shared machine a neighbour's burst can slow whole calls.
  return dict(ms_per_step=1e3 * step_s, examples_per_s=examples_per_step / step_s,
              ms_per_step_min=1e3 * min(call_times_s) / steps_per_call,
              examples_per_step=examples_per_step, call_times_s=call_times_s)


def per_call(call_times_s: list[float]) -> dict:
  """ms of the median (and fastest) call, for rows without steps (a sweep, a whole run)."""
  return dict(ms_per_call=1e3 * statistics.median(call_times_s),
              ms_per_call_min=1e3 * min(call_times_s), call_times_s=call_times_s)


def interleaved(calls: dict[str, tuple[Callable, Callable]], num_rounds: int) -> dict[str, list]:
  """Call times of several steps, one call of each per round, so that a neighbour's
  burst of load on a shared machine falls on all of them alike."""
  times = {name: [] for name in calls}
  for _ in range(num_rounds):
    for name, (call, sync) in calls.items():
      times[name] += time_calls(call, 1, sync)
  return times
