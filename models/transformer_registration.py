"""Registers the built-in model families with models/registry.py.

Kept apart from registry.py so the registry itself imports no model code (and so a new family
adds one line here)."""
from models import registry
from models.transformer import Transformer, TransformerConfig

registry.register("transformer", TransformerConfig)(Transformer)
import models.mswa  # noqa: E402,F401  (registers "mswa" and its gin configurable MSWAConfig)
