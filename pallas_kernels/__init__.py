"""Pallas kernels for swiftlm, each beside a pure-jnp reference (DESIGN.md "Kernels").

Models reach these only through models/core/attention.py.
"""
from pallas_kernels.blocked_attention import blocked_window_attention
from pallas_kernels.window_attention import window_attention
from pallas_kernels.window_attention import window_attention_reference

__all__ = ["blocked_window_attention", "window_attention", "window_attention_reference"]
