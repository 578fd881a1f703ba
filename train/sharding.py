"""Device mesh and logical-axis rules: where every parameter, optimizer moment and batch lives.

The mesh has three named axes:

    data    pure data parallelism: each slice holds a full copy of the parameters
    fsdp    data parallelism with parameters, gradients and optimizer moments sharded along
            `embed` (ZeRO-3 style; Rajbhandari et al. 2020, arXiv 1910.02054)
    tensor  tensor (model) parallelism over heads, MLP hidden units and the vocabulary
            (Shoeybi et al. 2019, arXiv 1909.08053), and expert parallelism over the
            experts of MoE layers (Lepikhin et al. 2020, arXiv 2006.16668)

Models name their parameter axes (`embed`, `heads`, ...; models/core/params.py) and never
mention devices; the rules below map those names onto mesh axes. A dimension whose size the
mesh axes do not divide is replicated instead (and logged), so any model runs on any mesh.
The batch is split over data x fsdp. XLA's SPMD partitioner inserts the collectives, so the
train step is the same program on one device or many.
"""
import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import gin
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # Expert parallelism: MoE layers split their experts over the model-parallel axis (an
    # expert weight's `mlp` dimension then stays whole, since `tensor` is taken).
    ("expert", "tensor"),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1, meaning all devices the others leave.

    rules: (logical name, mesh axes) pairs; names that no rule mentions are replicated.
    """
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    def __post_init__(self):
        # Tuples throughout, so a config bound with lists (gin, JSON) stays hashable.
        object.__setattr__(self, "rules", tuple(
            (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in self.rules))
        sizes = self.sizes_spec
        for name, size in zip(MESH_AXES, sizes):
            if size == 0 or size < -1:
                raise ValueError(f"MeshConfig.{name}={size}; sizes must be >= 1 or -1 "
                                 "(all remaining devices)")
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig{dict(zip(MESH_AXES, sizes))} has more than one -1; "
                             "at most one axis can take the remaining devices")
        for name, axes in self.rules:
            for axis in _as_tuple(axes):
                if axis not in MESH_AXES:
                    raise ValueError(f"rule {name!r} -> {axes!r} names unknown mesh axis "
                                     f"{axis!r}; valid: {MESH_AXES}")

    @property
    def sizes_spec(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for `num_devices` available devices."""
        sizes = list(self.sizes_spec)
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs a device count "
                                 f"divisible by {fixed}; have {num_devices} devices")
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed > num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {fixed} devices; "
                             f"have {num_devices}")
        return tuple(sizes)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def make_mesh(config: MeshConfig | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over the first data*fsdp*tensor of `devices` (default: all)."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    sizes = config.resolve(len(devices))
    return Mesh(np.asarray(devices[:math.prod(sizes)]).reshape(sizes), MESH_AXES)


def spec_for(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES, *,
             name: str = "") -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes and this shape on `mesh`.

    A dimension the mapped mesh axes do not divide, or whose mesh axes an earlier dimension
    already uses, is replicated (logged at INFO with `name`). Axes of size 1 are dropped.
    """
    if logical_axes is None:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(f"{name or 'array'}: logical axes {tuple(logical_axes)} and shape "
                         f"{tuple(shape)} differ in rank")
    table = dict(rules)
    used: set[str] = set()
    out = []
    for logical, size in zip(logical_axes, shape):
        axes = tuple(a for a in _as_tuple(table.get(logical)) if mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and (size % ways or used.intersection(axes)):
            why = (f"size {size} is not divisible by {ways}" if size % ways
                   else "its mesh axes are already used by another dimension")
            log.info("replicating dim %r of %s (shape %s) instead of sharding it over %s: %s",
                     logical, name or "array", tuple(shape), axes, why)
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_shardings(params: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.State:
    """NamedShardings for a state of nnx.Params (concrete or abstract), from their logical
    axis metadata (`out_sharding`)."""
    logical = nnx.get_partition_spec(params)

    def one(path, array, spec):
        # A parameter created without logical names has an empty spec: replicate it.
        axes = tuple(spec) if spec else None
        return NamedSharding(mesh, spec_for(axes, array.shape, mesh, rules,
                                            name=jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(one, params, logical)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        params_shardings: nnx.State, mesh: Mesh) -> Any:
    """Shardings for an optax state: moments follow their parameter, the rest (step counts,
    scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that batch rows are split over."""
    return tuple(a for a in _as_tuple(dict(rules).get(BATCH)) if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   batch_size: int | None = None, *, leading: int = 0) -> NamedSharding:
    """Rows split over the batch axes (data x fsdp by default), other dimensions replicated;
    `leading` unsharded dimensions come before the rows (micro-batch stacks).

    With `batch_size`, raises ValueError if the batch does not split evenly."""
    axes = batch_axes(mesh, rules)
    ways = math.prod(mesh.shape[a] for a in axes)
    if batch_size is not None and batch_size % ways:
        raise ValueError(f"batch size {batch_size} does not split over the mesh's batch axes "
                         f"{axes} ({ways} ways); use a multiple of {ways}")
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), axes if axes else None))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host numpy batch -> global device arrays. In a multi-process run every process passes
    the same whole batch (each builds it from the same data config, so the iterator state is
    the same everywhere) and each device takes its own rows of it."""
    if jax.process_count() == 1:
        # device_put slices on the host; the multi-host path compiles a slice per device.
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
    return {k: jax.make_array_from_callback(np.shape(v), sharding,
                                            lambda index, v=np.asarray(v): v[index])
            for k, v in batch.items()}


def shard_model(model: nnx.Module, mesh: Mesh,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.Module:
    """Moves a model's parameters onto `mesh` by their logical axes, in place; returns it."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, param_shardings(params, mesh, rules)))
    return model


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the target orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
