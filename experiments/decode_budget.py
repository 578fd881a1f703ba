"""How many new tokens a decode request can ask for, checked on the host before anything is
compiled: `generate` sizes its token buffer and KV caches for prompt bucket + max_new_tokens
(rounded up to a power of two), so a huge max_new_tokens would allocate, compile and loop for
minutes before failing. The limit is the smaller of what the model declares as its context
length (a real checkpoint's metadata) and what the caches fit in half of the accelerator's
(or, on CPU, the host's available) memory.
"""
from __future__ import annotations

import os
from typing import Any

import jax

# The loop's own per-token buffers beside the caches (tokens, log-probs, masks): a margin.
_LOOP_BYTES_PER_TOKEN = 16
_PROBE_LENGTHS = (1024, 2048)


def cache_bytes(model: Any, length: int) -> int:
    """Bytes of model.init_cache(1, length), from shapes only (nothing is allocated)."""
    cache = jax.eval_shape(lambda: model.init_cache(1, length))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def available_memory() -> int:
    """Bytes one decode may use: half the first device's memory limit where the backend
    reports one (GPU, TPU), else half the host's available physical memory."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats (CPU)
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def largest_max_new_tokens(models: list[Any], prompt_length: int, *,
                           context_length: int | None = None,
                           memory_bytes: int | None = None) -> tuple[int, str]:
    """(the largest max_new_tokens that fits, what limits it) for one row of `prompt_length`
    tokens decoded with `models` (the target, and a draft if any)."""
    from decoding.generate import prompt_bucket

    memory_bytes = available_memory() if memory_bytes is None else memory_bytes
    lo, hi = _PROBE_LENGTHS
    sizes = [sum(cache_bytes(m, n) for m in models) for n in (lo, hi)]
    per_token = (sizes[1] - sizes[0]) / (hi - lo) + _LOOP_BYTES_PER_TOKEN
    fixed = max(sizes[0] - per_token * lo, 0)
    fits = int((memory_bytes - fixed) // per_token)
    # generate's buffer is the smallest power of two above bucket + max_new_tokens - 1.
    buffer = 1 << max(fits.bit_length() - 1, 0)
    bucket = prompt_bucket(prompt_length)
    largest = buffer - bucket
    reason = (f"the KV caches of a {buffer}-token buffer take {per_token * buffer / 2**30:.2f} "
              f"GiB of the {memory_bytes / 2**30:.1f} GiB available")
    if context_length is not None and context_length - prompt_length < largest:
        largest = context_length - prompt_length
        reason = f"the model's context length is {context_length}"
    return max(largest, 0), reason


def check_max_new_tokens(models: list[Any], prompt_length: int, max_new_tokens: int, *,
                         context_length: int | None = None,
                         memory_bytes: int | None = None) -> None:
    """ValueError, at once, if max_new_tokens does not fit; it names the largest that does."""
    largest, reason = largest_max_new_tokens(models, prompt_length,
                                             context_length=context_length,
                                             memory_bytes=memory_bytes)
    if max_new_tokens > largest:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit after a "
                         f"{prompt_length}-token prompt: the largest that fits is {largest} "
                         f"({reason})")
