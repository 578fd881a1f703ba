"""Parsing gin configs with errors that name the bad value and the valid choices.

Every configurable lives in an importable module; `register_configurables()` imports them all
so a config file can bind any of them regardless of what the caller imported first.
"""
import difflib
import importlib
import os
import pathlib
from typing import Sequence

import gin

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"

# Modules whose import registers gin configurables (models register in their own modules).
CONFIGURABLE_MODULES = (
    "models.registry", "models.transformer", "models.mswa", "models.diffusion",
    "train.synthetic_tasks", "train.data", "train.tokenizer",
    "train.trainer", "train.sharding", "decoding.sampling", "decoding.speculative",
    "decoding.generate",  # every sampler's config (the registry imports them all)
    "experiments.pipeline",
)


_GIN_BUILTINS = {"constant", "macro", "singleton"}


def register_configurables() -> None:
    for name in CONFIGURABLE_MODULES:
        importlib.import_module(name)
    # The registry imports the model families lazily; import them all now, before a parse
    # locks the config (a model module imported later could not register its configurable).
    importlib.import_module("models.registry").model_names()


def configurable_names() -> list[str]:
    """Names of every registered gin configurable (e.g. 'TransformerConfig')."""
    register_configurables()
    registry = gin.config._REGISTRY  # gin has no public listing; this mapping is stable.
    names = {selector.split(".")[-1] for selector, _ in registry.items()}
    return sorted(names - _GIN_BUILTINS)


def shipped_configs() -> list[str]:
    """Names of the configs in experiments/configs/ (usable as --gin_file=NAME)."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.gin"))


def resolve_config_file(path: str) -> str:
    """`path` as given, or relative to experiments/configs/ (so `quickstart.gin` works)."""
    for candidate in (path, CONFIG_DIR / path):
        if os.path.isfile(candidate):
            return str(candidate)
    raise ValueError(f"gin file {path!r} not found; shipped configs: {shipped_configs()}")


def describe(files: Sequence[str], bindings: Sequence[str]) -> str:
    """What a run is configured from, for the start of its log: files then bindings."""
    lines = [f"gin files: {', '.join(files) if files else '(none)'}"]
    lines += [f"gin binding: {b}" for b in bindings]
    return "\n".join(lines)


def parse(files: Sequence[str] = (), bindings: Sequence[str] = (), *,
          finalize: bool = True) -> None:
    """Clears gin and applies `files` then `bindings`; errors name the bad configurable."""
    register_configurables()
    gin.clear_config()
    resolved = [resolve_config_file(f) for f in files]
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=finalize)
    except ValueError as err:
        message = str(err)
        if "No configurable matching" in message:
            name = message.split("'")[1] if "'" in message else ""
            close = difflib.get_close_matches(name.split(".")[-1], configurable_names(), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(f"{message}\n{hint} Valid configurables: "
                             f"{configurable_names()}") from None
        raise
