"""Multi-host runs: joining the cluster (one process per host) before any JAX work."""
from __future__ import annotations

import jax


def initialize(cluster) -> None:
  """jax.distributed.initialize() once per process (see `config.cluster`)."""
  if not jax.distributed.is_initialized():
    jax.distributed.initialize()
