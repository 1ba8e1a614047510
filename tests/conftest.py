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
