"""Shared pytest setup: CPU only, float32 matmuls at full precision, quiet Pallas warnings."""
import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Reference comparisons need true f32 matmuls (the CPU default already is; pin it anyway).
jax.config.update("jax_default_matmul_precision", "highest")
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
