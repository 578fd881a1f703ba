"""Model shapes the benchmarks share, defined once.

`DECODE_SIZES` are the decode benchmark's shapes (experiments/bench/decode.py), which the
verification-cost benchmark reuses; `gin_model_config` reads the model shape of a shipped gin
config (e.g. the speculative benchmark's target_small.gin) without building a run.
"""
import gin

from models.transformer import TransformerConfig

DECODE_SIZES: dict[str, TransformerConfig] = {
    # The repo's tiny baseline shape: byte vocabulary, where per-step overhead dominates.
    "tiny": TransformerConfig(vocab_size=260, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2),
    # ~100.1M parameters: Llama-style GQA (12 query heads over 4 kv heads), SwiGLU width 2048,
    # a 32000-token vocabulary with a tied head.
    "100m": TransformerConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                              n_kv_heads=4, tie_embeddings=True),
}


def gin_model_config(gin_file: str) -> TransformerConfig:
    """The TransformerConfig a shipped gin file sets (gin is cleared before and after)."""
    from experiments import gin_config

    gin_config.parse([gin_file], finalize=False)
    try:
        return TransformerConfig()
    finally:
        gin.clear_config()
