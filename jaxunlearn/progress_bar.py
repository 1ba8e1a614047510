"""The progress bar of a training run (`Trainer.run`): steps done, loss, examples per second."""
from __future__ import annotations

import time

from tqdm.auto import tqdm


class ProgressBar:
  """One run's tqdm bar, moved once per chunk; it draws nothing when not `enabled`."""

  def __init__(self, total: int, *, initial: int, desc: str, enabled: bool, position: int):
    """`initial`: the steps already done (on resume); `position`: the bar's line, apart from
    those of runs in parallel threads."""
    self.desc = desc
    self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit="step",
                     dynamic_ncols=True, leave=True, position=position)
    # The rate counts the examples of this process's chunks only, resumed or not.
    self._t0, self._seen = time.perf_counter(), 0

  def phase(self, name: str) -> None:
    """Shows which of the run's phases is running."""
    self._bar.set_description(f"{self.desc}/{name}")

  def advance(self, losses_K, examples: int) -> None:
    """Moves on by a finished chunk's steps; shows their mean loss and the examples per second."""
    self._seen += examples
    rate = self._seen / max(time.perf_counter() - self._t0, 1e-9)
    self._bar.update(len(losses_K))
    self._bar.set_postfix(loss=f"{losses_K.mean():.4f}", ex_per_s=f"{rate:,.0f}")

  def close(self) -> None:
    self._bar.close()
