"""Shared pytest setup: CPU only, float32 matmuls at full precision, XLA's backend at -O0, quiet
Pallas warnings, and under xdist one jax compilation cache for the whole run and one torch
thread per worker."""
import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is dominated by compiling many small programs, not by running them: XLA:CPU's
# backend at -O0 compiles them about a quarter faster (numerics are the same ops; every
# tolerance stays as written). Subprocesses the tests start inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Reference comparisons need true f32 matmuls (the CPU default already is; pin it anyway).
jax.config.update("jax_default_matmul_precision", "highest")
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


import gin  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    """Under xdist, points jax's persistent compilation cache at one directory of this run
    (beside the workers' temporary directories; pytest rotates it away with them). Many tests
    compile the same programs (the shared tiny models through the same samplers) in different
    files and workers, and the subprocess tests (launches, sweeps, notebooks) compile what
    in-process tests did: each compiles once. Runs before any test module is imported, so
    before jax decides whether a cache is in use."""
    if not hasattr(config, "workerinput") or not config.option.basetemp:
        return
    # Two workers share the two cores: torch (the HF reference models) at its default of one
    # thread per core spins against the other worker; one thread each wastes none.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pathlib
    path = pathlib.Path(config.option.basetemp).parent / "jax_compile_cache"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)  # subprocesses inherit it
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"   # ... and this
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Every test starts and ends with an empty, unlocked gin config: launchers finalize
    (lock) it, and a test that parses configs must not leak bindings or the lock into the
    next test its worker runs."""
    gin.clear_config()
    yield
    gin.clear_config()
