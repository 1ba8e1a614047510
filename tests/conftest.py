"""Tests run on 8 fake CPU devices, so the data-parallel path is what gets tested."""
import os
import tempfile

# Must be set before jax initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's compilation cache in a fresh folder, never the user's (config.compilation_cache
# yields to a cache dir JAX already has).
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxunlearn-test-xla-")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after each test module.

  A whole suite in one process compiles thousands of programs; each holds mapped code
  pages, and a process past the kernel's vm.max_map_count (65,530 here) crashes inside
  XLA's compiler (a segfault, not an error). Module fixtures are gone by then, so
  nothing still needs them.
  """
  yield
  import jax
  gc.collect()
  jax.clear_caches()
