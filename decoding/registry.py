"""The sampler registry: name -> how to build the sampler and what it needs (DESIGN.md, "The
decoding loop"). `decoding/generate.py` finds every sampler here and has no per-sampler branch;
a sampler family lists its entries next to its code, and a sampler checks its own request on
the host (`check`) before anything is compiled.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

# check(name, sampler, model, draft_model, prompts, budgets) -> None, raising ValueError that
# names the bad value: prompts are the host-side prompt rows (int64 arrays), budgets the
# per-row max_new_tokens (int32[B]).
Check = Callable[[str, Any, Any, Any, list[np.ndarray], np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    """build(target_graph, draft_graph, config, sampling_filters) -> sampler.

    draft: "required", "optional" (self-speculation's trained adapter) or "none".
    samples: whether it draws from a SamplingConfig (else it is greedy).
    config_cls: its config class (gin-configurable), or None.
    check: its own host-side request check, or None.
    """
    build: Callable[..., Any]
    draft: str
    samples: bool
    config_cls: type | None
    check: Check | None = None

    def __post_init__(self):
        if self.draft not in ("required", "optional", "none"):
            raise ValueError(f"draft={self.draft!r} must be 'required', 'optional' or 'none'")


def needs_causal_model(name: str, sampler, model, draft_model, prompts, budgets) -> None:
    """Autoregressive samplers decode through the cache protocol (init_cache / extend)."""
    del sampler, draft_model, prompts, budgets
    if not hasattr(model, "extend"):
        raise ValueError(f"sampler {name!r} decodes autoregressively and needs a causal model "
                         f"with a KV cache (extend); {type(model).__name__} has none (a masked "
                         "diffusion model decodes with the diffusion samplers)")
