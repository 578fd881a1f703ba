"""The model protocol every causal swiftlm model implements (DESIGN.md, "Autoregressive models").

    __call__(tokens[B, T], *, segment_ids=None, positions=None) -> ModelOutput
    init_cache(batch_size, max_length) -> cache        # a pytree of fixed-shape arrays
    extend(tokens[B, S], cache, *, num_tokens=None) -> (logits[B, S, V], cache)
                                                       # num_tokens[B]: real tokens per row
    rewind(cache, lengths[B]) -> cache                 # drop entries at and past lengths[b]

`num_tokens` is how a ragged batch is prefilled in one call: row b keeps only its first
num_tokens[b] tokens (models with ring buffers must not let the padding overwrite history).
Every cache exposes `lengths: int32[B]`, the number of tokens each row holds, so the decoding
loop can read positions without knowing the cache's layout.
"""
from typing import Any, Protocol

import flax.struct
import jax


@flax.struct.dataclass
class ModelOutput:
    """What a training forward pass returns.

    aux_loss: scalar added to the LM loss by the trainer (router balance, z-loss, ...; 0 if none).
    metrics: scalars or small arrays researchers want to plot (expert load, depth histogram, ...).
    """
    logits: jax.Array
    aux_loss: jax.Array
    metrics: dict[str, Any]


class CausalLM(Protocol):
    vocab_size: int

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput: ...

    def init_cache(self, batch_size: int, max_length: int) -> Any: ...

    def extend(self, tokens: jax.Array, cache: Any, *,
               num_tokens: jax.Array | None = None) -> tuple[jax.Array, Any]: ...

    def rewind(self, cache: Any, lengths: jax.Array) -> Any: ...
