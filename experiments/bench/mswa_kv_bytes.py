"""KV-cache memory of MSWA (arXiv 2501.01039) against full attention at a long context.

MSWA decodes with ring buffers sized by each kv head's window plus the speculative rewind
margin, so its cache stops growing with the context; full attention keeps every position. The
bytes are measured, not computed: the sum of `.nbytes` over the leaves of each model's
`init_cache(batch, context)` (MSWA's rings including their per-slot positions, the baseline
Transformer's full KV cache). Models are built abstractly (nnx.eval_shape), so no weights are
allocated; only the caches are.

    python -m experiments.bench.mswa_kv_bytes --context=8192

prints one JSON line per multiplier preset: {"bench": "mswa_kv_bytes", "case": ...,
"metric": "kv_bytes_ratio", "value": MSWA bytes / full-attention bytes, "goal": null, ...}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import jax
from flax import nnx

from models.mswa import MSWA, MULTIPLIER_PRESETS, MSWAConfig
from models.transformer import Transformer, TransformerConfig

# A realistic ~0.4B-parameter decoder: head_dim 64, GQA 4:1, base window 1024 (the official
# fine-tuning setup's w for 4k contexts), bf16 caches as served.
REALISTIC = MSWAConfig(vocab_size=32000, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4,
                       base_window=1024, rewind_margin=8, dtype="bfloat16")


def cache_bytes(ctor, config, batch_size: int, context: int) -> int:
    model = nnx.eval_shape(lambda: ctor(config, rngs=nnx.Rngs(0)))
    cache = model.init_cache(batch_size, context)
    return sum(x.nbytes for x in jax.tree.leaves(cache))


def measure(config: MSWAConfig, batch_size: int, context: int) -> dict:
    base = TransformerConfig(**{f.name: getattr(config, f.name)
                                for f in dataclasses.fields(TransformerConfig)})
    full = cache_bytes(Transformer, base, batch_size, context)
    mswa = cache_bytes(MSWA, config, batch_size, context)
    return {
        "bench": "mswa_kv_bytes", "case": f"{config.multiplier_preset}_ctx{context}",
        "metric": "kv_bytes_ratio", "value": mswa / full, "goal": None,
        "mswa_bytes": mswa, "full_attention_bytes": full,
        "window_budget_ratio": config.window_budget_ratio(),
        "context": context, "batch_size": batch_size, "base_window": config.base_window,
        "rewind_margin": config.rewind_margin, "n_layers": config.n_layers,
        "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim, "dtype": config.dtype,
        "machine": platform.machine(), "backend": jax.default_backend(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--base_window", type=int, default=REALISTIC.base_window)
    p.add_argument("--rewind_margin", type=int, default=REALISTIC.rewind_margin)
    p.add_argument("--presets", nargs="+", default=list(MULTIPLIER_PRESETS),
                   choices=list(MULTIPLIER_PRESETS))
    args = p.parse_args(argv)
    for preset in args.presets:
        config = dataclasses.replace(REALISTIC, multiplier_preset=preset,
                                     base_window=args.base_window,
                                     rewind_margin=args.rewind_margin)
        print(json.dumps(measure(config, args.batch_size, args.context)), flush=True)


if __name__ == "__main__":
    main()
