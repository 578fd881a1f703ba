"""Pallas API differences between jax versions and backends, kept in one place.

Two jobs live here (see DESIGN.md "Kernels" and shared/specs/kernels.md §1, §4.3):

1. Import guards and the compiler-params picker. jax renamed the backend parameter classes
   (0.7: ``TPUCompilerParams`` -> ``pltpu.CompilerParams``, ``TritonCompilerParams`` ->
   ``pltriton.CompilerParams``), deprecated the Triton backend (0.11) and made Mosaic GPU the
   default GPU lowering (0.9). Since 0.9 the *type* of ``compiler_params`` picks the GPU
   lowering, so a Triton-style kernel that passes ``None`` silently goes to Mosaic GPU and fails
   to lower there. Every kernel therefore asks :func:`compiler_params` for its dataclass.

2. Static checks of the block shapes that the hardware compilers enforce and interpret mode does
   not (an illegal TPU block of (4, 32) or a non-power-of-two Triton tile runs fine on CPU and
   fails on the device). Kernel wrappers call them before building a ``pallas_call`` so a
   config that would fail on hardware fails on CPU CI too, with an error naming the value.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
from jax.experimental.pallas import tpu as pltpu

try:  # The Triton backend is deprecated in 0.11 and may be removed later.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
    pltriton = None

TPUCompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
TritonCompilerParams = None
if pltriton is not None:
    TritonCompilerParams = (getattr(pltriton, "CompilerParams", None)
                            or getattr(pltriton, "TritonCompilerParams", None))
InterpretParams = getattr(pltpu, "InterpretParams", None)

BACKENDS = ("gpu", "tpu")


def resolve_style(interpret: Any, backend: str | None, fallback: str) -> tuple[Any, str]:
    """(interpret, backend) for a ``pallas_call`` on this platform. Pallas only interprets on
    CPU, so ``interpret=None`` means interpret there; ``backend=None`` means the platform's
    own kernel style, or the Triton one on CPU (the style the GPU benchmark machines run;
    tests cover both). Refuses a style that cannot compile here, naming what would work."""
    platform = jax.default_backend()
    if interpret is None:
        interpret = platform not in BACKENDS
    if backend is None:
        backend = platform if platform in BACKENDS else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {backend!r}; valid: {BACKENDS}.")
    if not interpret and platform != backend:
        raise ValueError(f"impl='pallas' with backend={backend!r} cannot compile on the "
                         f"{platform!r} platform; pass interpret=True (or {fallback}).")
    return interpret, backend


@functools.cache
def mosaic_gpu():
    """Returns ``jax.experimental.pallas.mosaic_gpu`` or None.

    Imported lazily: it needs absl-py (not pulled in by ``jax[cpu]``) and no kernel here uses
    it yet; it is the future home of the GPU kernels once the Triton backend is removed.
    """
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except Exception:  # ImportError, or a missing absl-py  # pragma: no cover
        return None
    return plgpu


def is_tpu_interpret(interpret: Any) -> bool:
    """True when ``interpret`` asks for the TPU simulator (``pltpu.InterpretParams``)."""
    return InterpretParams is not None and isinstance(interpret, InterpretParams)


def compiler_params(backend: str, interpret: Any = False, *, tpu: dict | None = None,
                    triton: dict | None = None):
    """The one compiler-params dataclass a ``pallas_call`` of the given kernel style takes.

    ``backend`` is the kernel *style*: "tpu" (Mosaic TPU) or "gpu" (Triton). Under the TPU
    simulator (``interpret=pltpu.InterpretParams(...)``) Triton params are rejected with an
    AssertionError, so a GPU-style kernel gets None there (its params are ignored when
    interpreted anyway).
    """
    if backend == "tpu":
        return TPUCompilerParams(**(tpu or {}))
    if backend == "gpu":
        if is_tpu_interpret(interpret):
            return None
        if TritonCompilerParams is None:  # pragma: no cover - depends on the installed jax
            raise RuntimeError(
                "This jax has no Pallas Triton backend (jax.experimental.pallas.triton); the "
                "GPU-style kernels need it. Use jax<0.12 or impl='xla_blocked'.")
        return TritonCompilerParams(**(triton or {}))
    raise ValueError(f"Unknown kernel backend {backend!r}; valid: {BACKENDS}.")


# --------------------------------------------------------------------------------------------
# Static checks: what Mosaic TPU and Triton reject but interpret mode accepts (kernels.md §4.3).
# --------------------------------------------------------------------------------------------
TPU_SUBLANES = 8
TPU_LANES = 128


def check_tpu_block_shape(name: str, block_shape: Sequence[int | None],
                          array_shape: Sequence[int]) -> None:
    """Mosaic TPU rule: the last two block dims are divisible by (8, 128) or equal the array's.

    ``None`` entries are squeezed dims (size 1). Raises ValueError naming the operand.
    """
    if len(block_shape) != len(array_shape):
        raise ValueError(f"{name}: block shape {tuple(block_shape)} has rank "
                         f"{len(block_shape)} but the array {tuple(array_shape)} has rank "
                         f"{len(array_shape)}.")
    dims = [1 if d is None else int(d) for d in block_shape]
    rules = [(-1, TPU_LANES, "last (lane)")]
    if len(dims) >= 2:
        rules.append((-2, TPU_SUBLANES, "second-to-last (sublane)"))
    for axis, multiple, what in rules:
        if dims[axis] % multiple and dims[axis] != array_shape[axis]:
            raise ValueError(
                f"{name}: block shape {tuple(block_shape)} on array {tuple(array_shape)} cannot "
                f"be tiled on TPU: the {what} block dim {dims[axis]} must be a multiple of "
                f"{multiple} or equal the array dim {array_shape[axis]}.")


def check_tpu_block_size(name: str, value: int) -> None:
    """A sequence tile that becomes the sublane dim of a TPU block must be a multiple of 8."""
    if value < 1 or value % TPU_SUBLANES:
        raise ValueError(f"{name}={value} cannot be tiled on TPU: sequence blocks must be "
                         f"positive multiples of {TPU_SUBLANES} (Mosaic (8, 128) tiling).")


TRITON_MIN_DOT_DIM = 16


def check_triton_block_size(name: str, value: int) -> None:
    """Triton rule: tiles are powers of two (every in-kernel array is) and dot dims >= 16."""
    if value < TRITON_MIN_DOT_DIM or value & (value - 1):
        raise ValueError(
            f"{name}={value} cannot be tiled by Triton: tiles must be powers of two "
            f"(Pallas Triton lowering) and at least {TRITON_MIN_DOT_DIM} (tl.dot minimum).")


def check_triton_array_shape(name: str, shape: Sequence[int]) -> None:
    """Every array a Triton kernel loads or computes must have a power-of-two size."""
    size = math.prod(shape)
    if size & (size - 1):
        raise ValueError(f"{name}: in-kernel array of shape {tuple(shape)} has size {size}, not "
                         "a power of two, which the Pallas Triton lowering rejects.")
