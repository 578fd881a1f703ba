"""Shared pytest setup: CPU only, float32 matmuls at full precision, quiet Pallas warnings."""
import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Reference comparisons need true f32 matmuls (the CPU default already is; pin it anyway).
jax.config.update("jax_default_matmul_precision", "highest")
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Every test starts and ends with an empty, unlocked gin config: launchers finalize
    (lock) it, and a test that parses configs must not leak bindings or the lock into the
    next test its worker runs."""
    gin.clear_config()
    yield
    gin.clear_config()
