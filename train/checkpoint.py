"""Checkpoints of a training run: model parameters, optimizer state, data-iterator position and
metadata, in one orbax CheckpointManager directory per workdir (`<workdir>/checkpoints/<step>`).

Each step directory holds four orbax items:

    params     the model's nnx.Param state (f32 master weights), sharded as it was in memory
    opt_state  the optax state
    data       the training iterator's get_state() as JSON (any iterator with that contract)
    meta       model registry name, model config (as a dict), config hash, parameter shapes,
               and a checksum of every array in params and opt_state

Arrays restore onto whatever shardings the caller asks for, so a checkpoint written under one
mesh loads under another or on one device. Saves are asynchronous where orbax offers it:
`save` returns once the arrays are copied off the device, and `wait`/`close` block until the
files are committed.

Safety. Before resuming, `check_compatible` compares the workdir's metadata with the model
about to be built and raises ValueError naming both when the architecture or any parameter
shape differs, before anything is written. A step whose files are missing, truncated or fail
their checksums is reported with a warning and the previous step is used instead; nothing is
ever deleted: when training resumes past a corrupt step, that step's directory is moved to
`<workdir>/checkpoints_corrupt/` (so the new save of that step number does not collide with it
and keep-N never garbage-collects it).
"""
import base64
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from models import registry
from train import sharding as sharding_lib

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "checkpoints_corrupt"


# ----------------------------------------------------------------------------- metadata


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _tuplify(value: Any) -> Any:
    # JSON has no tuples; frozen configs hold tuples so they stay hashable.
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(config))


def config_hash(model_name: str, config: Any) -> str:
    canonical = json.dumps([model_name, config_to_dict(config)], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_from_dict(model_name: str, values: dict[str, Any]) -> Any:
    """Rebuilds model `model_name`'s config from `config_to_dict` output."""
    config_cls, _ = registry.lookup(model_name)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"checkpoint config for {model_name!r} has fields {unknown} that "
                         f"{config_cls.__name__} does not know; its fields: {sorted(names)}")
    return config_cls(**{k: _tuplify(v) for k, v in values.items()})


def array_shapes(params: Any) -> dict[str, list[int]]:
    """{key path: shape} of every array in a pytree (concrete or abstract)."""
    return {jax.tree_util.keystr(path): list(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _leaf_checksum(x: jax.Array) -> jax.Array:
    # The bits summed as uint32 (wrapping): exact and independent of summation order, so the
    # same array gives the same checksum under every sharding, and any flipped bit shows.
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
    return [_leaf_checksum(x) for x in jax.tree.leaves(tree)]


def checksums(tree: Any) -> list[int]:
    return [int(c) for c in jax.device_get(_checksums(tree))]


# ----------------------------------------------------------------------------- data state


def _encode_data_state(state: Any) -> dict[str, Any]:
    if isinstance(state, bytes):
        return {"bytes_b64": base64.b64encode(state).decode("ascii")}
    try:
        json.dumps(state)
    except TypeError as e:
        raise ValueError(f"the data iterator's get_state() returned {type(state).__name__}, "
                         f"which is neither bytes nor JSON-serialisable: {e}") from None
    return {"json": state}


def _decode_data_state(stored: dict[str, Any]) -> Any:
    if "bytes_b64" in stored:
        return base64.b64decode(stored["bytes_b64"])
    return stored["json"]


# ----------------------------------------------------------------------------- manager


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that reads fine but does not fit the arrays this run expects."""


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any | None
    data_state: Any | None
    metadata: dict[str, Any]
    model_state: Any = None      # the model's TrainingState variables (empty State if none)


class Checkpointer:
    """The checkpoints of one workdir (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 or None (keep all)")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.directory = os.path.join(self.workdir, CHECKPOINT_SUBDIR)
        if read_only and not os.path.isdir(self.directory):
            raise ValueError(f"no checkpoints in {self.workdir!r}: {self.directory!r} does "
                             "not exist")
        options = ocp.CheckpointManagerOptions(
            # (read-only managers must not keep or save anything; saying so avoids warnings)
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- reading ---------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def read_metadata(self, step: int) -> dict[str, Any]:
        if step not in self.steps():
            raise ValueError(f"no checkpoint step {step} in {self.directory!r}; "
                             f"available steps: {self.steps()}")
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def latest_metadata(self) -> dict[str, Any] | None:
        """Metadata of the newest step whose metadata is readable (None if no checkpoints)."""
        for step in reversed(self.steps()):
            try:
                return self.read_metadata(step)
            except Exception:  # noqa: BLE001 - corruption is reported by restore()
                continue
        return None

    def check_compatible(self, model_name: str, model_config: Any, abstract_params: Any) -> None:
        """ValueError naming both sides if the checkpoints here are of another architecture or
        have other parameter shapes; a warning if only shape-neutral config fields differ."""
        meta = self.latest_metadata()
        if meta is None:
            return
        ours = config_to_dict(model_config)
        theirs = meta["model_config"]
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        diff = ", ".join(f"{k}: {theirs.get(k)!r} (checkpoint) vs {ours.get(k)!r} (this run)"
                         for k in differing)
        both = (f"workdir {self.workdir!r} holds checkpoints of model {meta['model_name']!r} "
                f"(config hash {meta['config_hash']}), but this run builds model "
                f"{model_name!r} (config hash {config_hash(model_name, model_config)})")
        if meta["model_name"] != model_name:
            raise ValueError(f"{both}; use another workdir or the checkpoint's model")
        if meta["params_shapes"] != array_shapes(abstract_params):
            raise ValueError(f"{both}; parameter shapes differ. Config differences: {diff}")
        if differing:
            log.warning("resuming %s with a config that differs in shape-neutral fields: %s",
                        self.workdir, diff)

    def restore(self, abstract_params: Any, abstract_opt_state: Any | None = None, *,
                abstract_model_state: Any | None = None, step: int | None = None,
                with_data: bool = False, quarantine_corrupt: bool = False
                ) -> Restored | None:
        """Restores onto the shardings of the abstract targets (ShapeDtypeStructs).

        step=None: the newest step that reads back intact, falling back past corrupt ones with
        a warning; None if there are no checkpoints. An explicit corrupt step raises
        ValueError. quarantine_corrupt: move corrupt steps newer than the one used out of the
        manager's directory (training does this before writing new steps).
        """
        steps = self.steps()
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint step {step} in {self.directory!r}; "
                             f"available steps: {steps}")
        candidates = [step] if step is not None else list(reversed(steps))
        corrupt: list[int] = []
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, abstract_params, abstract_opt_state,
                                              abstract_model_state, with_data)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any other read failure: a corrupt step
                if step is not None:
                    raise ValueError(f"checkpoint step {step} in {self.directory!r} is "
                                     f"corrupt: {type(e).__name__}: {e}") from e
                log.warning("checkpoint step %d in %s is corrupt (%s: %s)", candidate,
                            self.directory, type(e).__name__, str(e)[:300])
                corrupt.append(candidate)
                continue
            if corrupt:
                log.warning("corrupt checkpoint step(s) %s in %s; using step %d instead",
                            corrupt, self.directory, candidate)
                if quarantine_corrupt:
                    self._quarantine(corrupt)
            return restored
        if corrupt:
            raise ValueError(f"every checkpoint in {self.directory!r} is corrupt (steps "
                             f"{corrupt}); see the warnings above for what failed")
        return None

    def _restore_step(self, step, abstract_params, abstract_opt_state, abstract_model_state,
                      with_data) -> Restored:
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        has_model_state = bool(jax.tree.leaves(abstract_model_state))
        if has_model_state:
            items["model_state"] = ocp.args.StandardRestore(abstract_model_state)
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        meta = self.read_metadata(step)
        for name, target in (("params", abstract_params), ("opt_state", abstract_opt_state)):
            if target is not None and meta[f"{name}_shapes"] != array_shapes(target):
                raise IncompatibleCheckpointError(
                    f"the {name} of checkpoint step {step} in {self.directory!r} do not match "
                    f"this run's (a changed model or optimizer config?): checkpoint "
                    f"{meta[f'{name}_shapes']}, this run {array_shapes(target)}")
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        sums = meta["checksums"]
        if checksums(out.params) != sums["params"]:
            raise ValueError(f"params of step {step} fail their checksums")
        opt_state = out.get("opt_state") if abstract_opt_state is not None else None
        if opt_state is not None and checksums(opt_state) != sums["opt_state"]:
            raise ValueError(f"optimizer state of step {step} fails its checksums")
        data = out.get("data") if with_data else None
        return Restored(step=step, params=out.params, opt_state=opt_state,
                        data_state=None if data is None else _decode_data_state(data),
                        metadata=meta, model_state=(out.get("model_state") if has_model_state
                                                    else abstract_model_state))

    def _quarantine(self, steps: Sequence[int]) -> None:
        target_root = os.path.join(self.workdir, CORRUPT_SUBDIR)
        os.makedirs(target_root, exist_ok=True)
        for step in steps:
            source = os.path.join(self.directory, str(step))
            target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(source, target)
            log.warning("moved corrupt checkpoint step %d to %s (kept, not deleted)", step,
                        target)
        self._manager.reload()

    # -- writing ---------------------------------------------------------------------------
    def save(self, step: int, params: Any, opt_state: Any, data_state: Any, *,
             model_name: str, model_config: Any, model_state: Any = None,
             extra: dict[str, Any] | None = None) -> None:
        """Starts saving `step` (asynchronously where enabled); keeps the newest max_to_keep.
        model_state: the model's non-parameter TrainingState, saved when it has any leaves."""
        meta = {
            "step": step,
            "model_name": model_name,
            "model_config": config_to_dict(model_config),
            "config_hash": config_hash(model_name, model_config),
            "params_shapes": array_shapes(params),
            "opt_state_shapes": array_shapes(opt_state),
            "checksums": {"params": checksums(params), "opt_state": checksums(opt_state)},
            **(extra or {}),
        }
        items = {"params": ocp.args.StandardSave(params),
                 "opt_state": ocp.args.StandardSave(opt_state),
                 "meta": ocp.args.JsonSave(_jsonable(meta))}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(_encode_data_state(data_state))
        if jax.tree.leaves(model_state):
            items["model_state"] = ocp.args.StandardSave(model_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# ----------------------------------------------------------------------------- decoding


def restore_model(workdir: str | os.PathLike, step: int | None = None, *,
                  mesh: jax.sharding.Mesh | None = None,
                  rules=sharding_lib.DEFAULT_RULES) -> tuple[nnx.Module, str, Any]:
    """(model, model_name, model_config) from a workdir's checkpoint (newest intact step by
    default), built through models.registry with only the parameters loaded.

    mesh: shard the parameters over it by their logical axes (default: the first device).
    """
    ckpt = Checkpointer(workdir, read_only=True, async_save=False)
    try:
        meta = ckpt.read_metadata(step) if step is not None else ckpt.latest_metadata()
        if meta is None:
            raise ValueError(f"no checkpoints in {ckpt.directory!r}")
        model_name = meta["model_name"]
        model_config = config_from_dict(model_name, meta["model_config"])
        _, ctor = registry.lookup(model_name)
        abstract = nnx.eval_shape(lambda: ctor(model_config, rngs=nnx.Rngs(0)))
        graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
        if mesh is None:
            mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
            shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()),
                                     abstract_params)
        else:
            shardings = sharding_lib.param_shardings(abstract_params, mesh, rules)
        replicated = jax.tree.map(
            lambda _: NamedSharding(mesh, PartitionSpec()), rest)
        restored = ckpt.restore(
            sharding_lib.abstract_with_shardings(abstract_params, shardings), step=step,
            abstract_model_state=sharding_lib.abstract_with_shardings(rest, replicated))
        model = nnx.merge(graphdef, restored.params, restored.model_state)
        model.eval()   # freezes TrainingState (router biases, counters) for inference
        return model, model_name, model_config
    finally:
        ckpt.close()


# ------------------------------------------------- small trained modules (adapters, heads)

def save_module(directory: str | os.PathLike, module: nnx.Module, meta_file: str,
                meta: dict[str, Any]) -> None:
    """Writes a small trained module of its own (an early-exit adapter, an acceptance head) to
    `directory`: its parameters (orbax, under params/) and `meta` (JSON, in `meta_file`: what
    a loader needs to rebuild the module and check it fits)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "params"), nnx.state(module, nnx.Param), force=True)
    with open(os.path.join(directory, meta_file), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def read_module_meta(directory: str | os.PathLike, meta_file: str, what: str) -> dict:
    """The meta JSON save_module wrote, or a one-line error naming `what` is missing."""
    path = os.path.join(os.path.abspath(directory), meta_file)
    if not os.path.isfile(path):
        raise ValueError(f"no {what} in {os.path.dirname(path)!r} (missing {meta_file})")
    with open(path) as f:
        return json.load(f)


def restore_module(directory: str | os.PathLike, module: nnx.Module) -> nnx.Module:
    """`module` (built from the meta) with the parameters save_module wrote."""
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.join(os.path.abspath(directory), "params"),
                                nnx.state(module, nnx.Param))
    nnx.update(module, restored)
    return module
