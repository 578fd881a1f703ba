"""Model names -> (config class, constructor), the one place configs and checkpoints look up
architectures. A gin config names the model (`experiment.model = "transformer"`) and binds its
config class (`TransformerConfig.d_model = 256`); the registry turns the name into both.
"""
import importlib
from typing import Callable

from flax import nnx

_MODELS: dict[str, tuple[type, Callable[..., nnx.Module]]] = {}


def register(name: str, config_cls: type):
    """Decorator registering a model constructor `ctor(config, *, rngs)` under `name`."""
    def wrap(ctor):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = (config_cls, ctor)
        return ctor
    return wrap


# The built-in families: (registered name, module, config class, constructor). The modules are
# imported lazily, in this one place, so that no model module imports the registry (no import
# cycle) and importing the registry stays cheap. A new family adds one line here.
_BUILTIN_MODELS = (
    ("transformer", "models.transformer", "TransformerConfig", "Transformer"),
    ("mswa", "models.mswa", "MSWAConfig", "MSWA"),
    ("block_transformer", "models.block_transformer", "BlockTransformerConfig",
     "BlockTransformer"),
    ("rmoe", "models.rmoe", "RMoEConfig", "RMoE"),
    ("mor", "models.mor", "MoRConfig", "MoR"),
    ("diffusion", "models.diffusion", "DiffusionConfig", "DiffusionLM"),
)


def _ensure_builtin_models_registered():
    """Registers the built-in families on first use."""
    if "transformer" in _MODELS:
        return
    for name, module_name, config_name, ctor_name in _BUILTIN_MODELS:
        module = importlib.import_module(module_name)
        register(name, getattr(module, config_name))(getattr(module, ctor_name))


def model_names() -> tuple[str, ...]:
    _ensure_builtin_models_registered()
    return tuple(sorted(_MODELS))


def lookup(name: str) -> tuple[type, Callable[..., nnx.Module]]:
    _ensure_builtin_models_registered()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {tuple(sorted(_MODELS))}")
    return _MODELS[name]


def build(name: str, config=None, *, seed: int = 0) -> nnx.Module:
    """Constructs model `name` with `config` (default: its gin-configured config)."""
    config_cls, ctor = lookup(name)
    config = config if config is not None else config_cls()
    if not isinstance(config, config_cls):
        raise ValueError(f"model {name!r} needs a {config_cls.__name__}, "
                         f"got {type(config).__name__}")
    return construct(ctor, config, seed=seed)


def construct(ctor: Callable[..., nnx.Module], config, *, seed: int = 0) -> nnx.Module:
    """ctor(config, rngs=...) run under jit: one compilation for the whole initialisation
    instead of one per parameter shape in eager mode (seconds saved at every model build)."""
    return nnx.jit(lambda: ctor(config, rngs=nnx.Rngs(seed)))()
