"""Configuration and parameter-sharing schedules of Mixture-of-Recursions (Bae, Kim, Bayat et
al.; arXiv 2507.10524), used by models/mor.py.

`n_layers` is the *effective* (unrolled) depth L, the depth of the vanilla Transformer MoR is
compared with. The sharing scheme maps the unrolled layers onto unique blocks:

  cycle            [(0..K-1)] x N_r                        K = L / N_r unique blocks
  sequence         [(0)^N_r, (1)^N_r, ...]                 K = L / N_r
  middle_cycle     [first] + [(1..K)] x N_r + [last]       K = (L - 2) / N_r (the paper's default)
  middle_sequence  [first] + [(1)^N_r, (2)^N_r, ...] + [last]

Recursion r (1-based) is the r-th group of K consecutive unrolled middle layers; each unrolled
layer keeps its own KV cache slot while its weights are tied by reference. A layer count that
does not divide is refused (the official code silently resamples layers with linspace).
"""
import dataclasses
import math

import gin

from models.transformer import TransformerConfig

SHARINGS = ("middle_cycle", "cycle", "sequence", "middle_sequence")
ROUTERS = ("expert", "token", "none")     # none: the plain Recursive Transformer
KV_STRATEGIES = ("recursion", "share")    # recursion-wise caching, recursive KV sharing
ROUTING_MODES = ("topk", "threshold")     # __call__: expert-choice top-k, or causal sigma>=0.5
BALANCING = ("loss", "loss_free")         # token-choice: Switch balancing loss, or a bias


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoRConfig(TransformerConfig):
    """TransformerConfig (n_layers = effective depth L) plus the recursion and its routers.

    num_recursions: N_r. capacities: expert-choice fraction of the sequence kept at each
      recursion (default (N_r - r + 1) / N_r), non-increasing, in (0, 1].
    router_alpha: gate scale (default 0.1 for expert-choice's sigmoid, 1.0 for token-choice's
      softmax). bce_coef: the auxiliary BCE that makes sigma(s) >= 0.5 a usable inference rule.
    z_loss_coef: router z-loss (off by default; 1e-5 is the token-choice setting).
    balance_coef: token-choice Switch-style balancing loss (balancing="loss").
    balancing: token-choice balancing, "loss" or "loss_free" (a selection bias moved by
      bias_update_rate * sign(mean load - load) after every training forward).
    capacity_warmup_steps: expert-choice capacity warmup (the official cap_warmup_step; 0 =
      off): capacities decay by a cosine from 1 to `capacities` over this many training
      forward passes (micro-batches when the trainer accumulates gradients).
    routing: what __call__ does for expert-choice: "topk" (training, non-causal) or
      "threshold" (causal, what extend does at inference).
    decode_capacity: per-recursion fraction of the batch rows a one-token decode step gathers
      (depth-wise batching); rows beyond it exit early and are counted in cache.overflow.
      Default: `capacities` for expert-choice, 1.0 (never overflows) otherwise.
    """
    num_recursions: int = 3
    sharing: str = "middle_cycle"
    router: str = "expert"
    kv_strategy: str = "recursion"
    capacities: tuple[float, ...] | None = None
    router_alpha: float | None = None
    router_temp: float = 1.0
    router_init_stddev: float = 0.02
    bce_coef: float = 1e-3
    z_loss_coef: float = 0.0
    balance_coef: float = 0.1
    balancing: str = "loss"
    bias_update_rate: float = 1e-3
    capacity_warmup_steps: int = 0
    routing: str = "topk"
    decode_capacity: tuple[float, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        for name, value, valid in (("sharing", self.sharing, SHARINGS),
                                   ("router", self.router, ROUTERS),
                                   ("kv_strategy", self.kv_strategy, KV_STRATEGIES),
                                   ("routing", self.routing, ROUTING_MODES),
                                   ("balancing", self.balancing, BALANCING)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {valid}")
        if self.num_recursions < 1:
            raise ValueError(f"num_recursions={self.num_recursions} must be at least 1")
        self.schedule  # raises for a layer count that does not fit the scheme
        _check_fractions("capacities", self.resolved_capacities, self.num_recursions)
        caps = self.resolved_capacities
        if any(b > a for a, b in zip(caps, caps[1:])):
            raise ValueError(f"capacities={caps} must be non-increasing (hierarchical "
                             "filtering keeps a subset of the previous recursion's tokens)")
        _check_fractions("decode_capacity", self.resolved_decode_capacity, self.num_recursions)
        if self.router_temp <= 0:
            raise ValueError(f"router_temp={self.router_temp} must be positive")
        if self.capacity_warmup_steps < 0:
            raise ValueError(f"capacity_warmup_steps={self.capacity_warmup_steps} must be >= 0 "
                             "(0 = no warmup)")
        if self.capacity_warmup_steps and self.router != "expert":
            raise ValueError(f"capacity_warmup_steps={self.capacity_warmup_steps} needs "
                             f"router='expert', got router={self.router!r}")
        if self.balancing == "loss_free" and self.router != "token":
            raise ValueError(f"balancing='loss_free' needs router='token', got "
                             f"router={self.router!r}")
        if self.bias_update_rate <= 0:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} must be positive")

    @property
    def resolved_capacities(self) -> tuple[float, ...]:
        n = self.num_recursions
        if self.capacities is None:
            return tuple((n - r) / n for r in range(n))
        return tuple(float(c) for c in self.capacities)

    @property
    def resolved_decode_capacity(self) -> tuple[float, ...]:
        if self.decode_capacity is not None:
            return tuple(float(c) for c in self.decode_capacity)
        if self.router == "expert":
            return self.resolved_capacities
        return (1.0,) * self.num_recursions

    @property
    def resolved_alpha(self) -> float:
        if self.router_alpha is not None:
            return float(self.router_alpha)
        return 0.1 if self.router == "expert" else 1.0

    @property
    def has_ends(self) -> bool:
        """Whether the first and last layers are unique (the middle-* schemes)."""
        return self.sharing.startswith("middle")

    @property
    def schedule(self) -> tuple[tuple[int, ...], ...]:
        """[N_r][K]: the unique shared block each unrolled layer of each recursion uses."""
        n, middle = self.num_recursions, self.n_layers - (2 if self.has_ends else 0)
        if middle < n or middle % n:
            need = "(n_layers - 2)" if self.has_ends else "n_layers"
            start = n + (2 if self.has_ends else 0)
            raise ValueError(
                f"n_layers={self.n_layers} does not fit sharing={self.sharing!r} with "
                f"num_recursions={n}: {need} must be a positive multiple of {n} "
                f"(valid n_layers: {start}, {start + n}, {start + 2 * n}, ...)")
        k = middle // n
        if self.sharing.endswith("cycle"):
            return tuple(tuple(range(k)) for _ in range(n))
        return tuple(tuple((r * k + j) // n for j in range(k)) for r in range(n))

    @property
    def layers_per_recursion(self) -> int:
        return len(self.schedule[0])

    def decode_rows(self, batch_size: int) -> tuple[int, ...]:
        """Static row capacity of each recursion in a one-token decode step."""
        return tuple(max(1, min(batch_size, math.ceil(f * batch_size - 1e-9)))
                     for f in self.resolved_decode_capacity)

    def ideal_compute_fraction(self) -> float:
        """Block applications per token of MoR over those of the Recursive Transformer of
        the same shape (top-k capacities; embedding and head not counted)."""
        ends = 2 if self.has_ends else 0
        k = self.layers_per_recursion
        return (ends + k * sum(self.resolved_capacities)) / (ends + k * self.num_recursions)


def _check_fractions(name: str, values: tuple[float, ...], n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{name}={values} must have one value per recursion "
                         f"(num_recursions={n})")
    for v in values:
        if not 0 < v <= 1:
            raise ValueError(f"{name}={values}: every value must be in (0, 1], got {v}")
