"""The training loop: jit-compiled train and eval steps and `train()`, which runs, checkpoints,
evaluates and resumes a run in a workdir.

One call of the train step is one optimizer update. With grad_accum_steps=k the batch's rows
are split into k micro-batches whose gradients a `lax.scan` sums inside the same jitted step,
so the result equals one step on the whole batch while only a micro-batch's activations are
alive at a time. The loss is the masked token cross-entropy summed over the batch divided by
the batch's scored-token count (so micro-batches of unequal fill are weighted exactly), plus
the model's aux_loss. Parameters stay f32; the model config's dtype picks the compute dtype.
A model's non-trainable state (`models.core.params.TrainingState`: a loss-free router bias, a
forward counter) rides in the TrainState beside the parameters: the forward may update it,
the step carries the update (through the micro-batches in order) and checkpoints save it.

`train()` is importable and flag-free so a notebook can call it; experiments/launch.py wraps it
with gin and absl. It resumes from the workdir's newest intact checkpoint (parameters,
optimizer state and the data iterator's position), saves periodically and at the end, saves
and returns early on SIGTERM, and stops with NonFiniteLossError on a non-finite loss without
saving the bad state.
"""
import dataclasses
import functools
import logging
import math
import os
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from models import registry
from train import checkpoint as checkpoint_lib
from train import optim
from train import sharding as sharding_lib
from train.metrics import MetricsLogger

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to optimise; the batch size and sequence length are the data side's.

    eval_every / checkpoint_every = 0: only at the end. eval_batches=None: the whole eval set.
    decay_fraction is the share of `steps` the WSD schedule spends decaying.
    """
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum_steps: int = 1
    eval_every: int = 0
    eval_batches: int | None = 16
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        optim.check_schedule(self.schedule)
        for name in ("steps", "grad_accum_steps", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"TrainConfig.eval_batches={self.eval_batches} must be >= 1 or "
                             "None (the whole eval set)")
        self.schedule_fn()  # validates the schedule's numbers now, not at step 0

    def schedule_fn(self) -> optim.Schedule:
        return optim.make_schedule(lr=self.lr, steps=self.steps, warmup_steps=self.warmup_steps,
                                   schedule=self.schedule, min_lr_ratio=self.min_lr_ratio,
                                   decay_fraction=self.decay_fraction)

    def optimizer(self) -> optax.GradientTransformation:
        return optim.make_optimizer(self.schedule_fn(), weight_decay=self.weight_decay,
                                    b1=self.b1, b2=self.b2, eps=self.eps,
                                    clip_norm=self.clip_norm)


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient norm or updated parameters of a step were not finite."""


@flax.struct.dataclass
class TrainState:
    params: Any          # nnx.State of nnx.Param (f32)
    opt_state: Any       # optax state
    step: jax.Array      # int32 scalar: optimizer updates applied so far
    model_state: Any     # nnx.State of the model's non-parameter variables (often empty)


# ----------------------------------------------------------------------------- steps


def _token_nll(graphdef, params, rest, batch, rng=None
               ) -> tuple[jax.Array, jax.Array, Any, Any]:
    """(summed masked token NLL, aux_loss, model metrics, the model's non-parameter state after
    the forward) of one forward pass.

    A model with its own objective (the masked diffusion LM's LLaDA loss) defines
    `training_loss(batch, rng) -> (summed loss, aux_loss, metrics)`; it is used instead of
    next-token cross-entropy and divided by the scored-token count like it."""
    # Rebuilt leaf by leaf so its variables belong to this trace: the forward may update
    # them (TrainingState), and nnx refuses to mutate a variable made under an outer trace
    # (rest reaches us past jax.value_and_grad's differentiated argument untouched).
    rest = jax.tree.map(lambda v: v, rest)
    model = nnx.merge(graphdef, params, rest)
    if hasattr(model, "training_loss"):
        nll_sum, aux, metrics = model.training_loss(
            batch, jax.random.key(0) if rng is None else rng)
    else:
        out = model(batch["inputs"], segment_ids=batch["segment_ids"],
                    positions=batch["positions"])
        nll = optax.softmax_cross_entropy_with_integer_labels(
            out.logits.astype(jnp.float32), batch["targets"])
        nll_sum, aux, metrics = jnp.sum(nll * batch["loss_mask"]), out.aux_loss, out.metrics
    return nll_sum, aux, metrics, nnx.split(model, nnx.Param, ...)[2]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optim.Schedule, grad_accum_steps: int = 1, *,
                    mesh: jax.sharding.Mesh | None = None, state_shardings: Any = None,
                    rules=sharding_lib.DEFAULT_RULES, donate: bool = True) -> Callable:
    """jit(step(state, batch) -> (state, metrics)); `state` is donated unless donate=False.

    With `state_shardings` the new state is pinned to them so it never drifts between steps.
    """
    k = grad_accum_steps

    def step_fn(state: TrainState, batch):
        rows = batch["inputs"].shape[0]
        if rows % k:
            raise ValueError(f"batch of {rows} rows does not split into "
                             f"grad_accum_steps={k} equal micro-batches")
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)
        # Randomness of model-provided losses (diffusion masking), fresh at every step.
        rng = jax.random.fold_in(jax.random.key(0), state.step)

        def loss_fn(params, rest, micro):
            nll_sum, aux, metrics, rest = _token_nll(graphdef, params, rest, micro, rng)
            return nll_sum / n_tokens + aux / k, (nll_sum, aux, metrics, rest)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if k == 1:
            (_, (nll_sum, aux, model_metrics, model_state)), grads = grad_fn(
                state.params, state.model_state, batch)
        else:
            # Strided split (row i goes to micro-batch i % k) keeps each device's rows on that
            # device when the batch is sharded over rows.
            micro = jax.tree.map(
                lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1), batch)
            if mesh is not None and (rows // k) % math.prod(
                    mesh.shape[a] for a in sharding_lib.batch_axes(mesh, rules)) == 0:
                micro = jax.lax.with_sharding_constraint(
                    micro, sharding_lib.batch_sharding(mesh, rules, leading=1))

            def body(carry, mb):
                acc, rest = carry
                (_, (nll_sum, aux, metrics, rest)), g = grad_fn(state.params, rest, mb)
                return (jax.tree.map(jnp.add, acc, g), rest), (nll_sum, aux, metrics)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, model_state), (nll_sums, auxs, stacked) = jax.lax.scan(
                body, (zeros, state.model_state), micro)
            nll_sum, aux = jnp.sum(nll_sums), jnp.mean(auxs)
            model_metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), stacked)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1,
                               model_state=model_state)
        if state_shardings is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        lm_loss = nll_sum / n_tokens
        loss = lm_loss + aux
        params_finite = jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        metrics = {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "tokens": n_tokens,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite,
                   "model": model_metrics}
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """jit(eval(params, rest, batch) -> (summed NLL in nats, scored tokens))."""
    def eval_fn(params, rest, batch):
        nll_sum, _, _, _ = _token_nll(graphdef, params, rest, batch)
        return nll_sum, jnp.sum(batch["loss_mask"])
    return jax.jit(eval_fn)


def default_bytes_fn(batch: Batch) -> int:
    """Scored targets: exactly the byte count for the byte tokenizer."""
    return int(np.sum(batch["loss_mask"]))


def evaluate(eval_step: Callable, params, rest, batches: Iterable[Batch], *,
             batch_sharding: NamedSharding, bytes_fn: Callable[[Batch], int] = default_bytes_fn,
             max_batches: int | None = None) -> dict[str, float]:
    """loss (nats/token), perplexity and bits per byte over `batches` (token-weighted)."""
    sums, tokens, num_bytes, n = [], [], 0, 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        _check_batch(batch)
        nll, count = eval_step(params, rest, sharding_lib.shard_batch(batch, batch_sharding))
        sums.append(nll)
        tokens.append(count)
        num_bytes += bytes_fn(batch)
        n += 1
    if n == 0:
        raise ValueError("the eval iterator yielded no batches")
    total_nll = float(np.sum(np.asarray(jax.device_get(sums), np.float64)))
    total_tokens = int(np.sum(jax.device_get(tokens)))
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": total_nll / (math.log(2) * max(num_bytes, 1)),
            "tokens": float(total_tokens), "bytes": float(num_bytes), "batches": float(n)}


def _check_batch(batch: Batch) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks keys {missing}; a batch needs {list(BATCH_KEYS)}, "
                         f"got {sorted(batch)}")


# ----------------------------------------------------------------------------- loop


class _StopOnSignal:
    """Sets `requested` on SIGTERM while installed; restores the previous handler on exit.
    Signal handlers can only be installed from the main thread; elsewhere this is inert."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM,
                          self._previous if self._previous is not None else signal.SIG_DFL)


@dataclasses.dataclass(frozen=True, eq=False)   # hashed by identity (lru_cache key)
class _ModelPrograms:
    graphdef: nnx.GraphDef
    abstract_params: Any     # ShapeDtypeStructs carrying the parameter shardings
    abstract_rest: Any       # the model's non-parameter state (TrainingState), replicated
    param_shardings: Any
    rest_shardings: Any
    init: Callable           # () -> (params, rest), sharded
    eval_step: Callable


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainPrograms:
    tx: optax.GradientTransformation
    abstract_opt_state: Any  # ShapeDtypeStructs carrying the optimizer-state shardings
    state_shardings: TrainState
    init_opt: Callable       # params -> opt_state, sharded
    train_step: Callable


# Built once per process and key, so a resumed or repeated run in the same process (a
# notebook, the tests) reuses the compiled programs instead of compiling them again.
@functools.lru_cache(maxsize=8)
def _model_programs(model_name: str, model_config: Any, seed: int, mesh: jax.sharding.Mesh,
                    rules: tuple) -> _ModelPrograms:
    _, ctor = registry.lookup(model_name)
    abstract = nnx.eval_shape(lambda: ctor(model_config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    param_sh = sharding_lib.param_shardings(abstract_params, mesh, rules)
    # Non-parameter state is small (router biases, counters): every device holds all of it.
    rest_sh = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), abstract_rest)

    def init():
        _, params, rest = nnx.split(ctor(model_config, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        return params, rest

    return _ModelPrograms(
        graphdef=graphdef,
        abstract_params=sharding_lib.abstract_with_shardings(abstract_params, param_sh),
        abstract_rest=sharding_lib.abstract_with_shardings(abstract_rest, rest_sh),
        param_shardings=param_sh, rest_shardings=rest_sh,
        init=jax.jit(init, out_shardings=(param_sh, rest_sh)),
        eval_step=make_eval_step(graphdef))


@functools.lru_cache(maxsize=8)
def _train_programs(model: _ModelPrograms, c: TrainConfig, mesh: jax.sharding.Mesh,
                    rules: tuple) -> _TrainPrograms:
    tx = c.optimizer()
    abstract_opt_state = jax.eval_shape(tx.init, model.abstract_params)
    opt_sh = sharding_lib.optimizer_shardings(tx, abstract_opt_state, model.param_shardings,
                                              mesh)
    state_sh = TrainState(params=model.param_shardings, opt_state=opt_sh,
                          step=NamedSharding(mesh, PartitionSpec()),
                          model_state=model.rest_shardings)
    return _TrainPrograms(
        tx=tx, state_shardings=state_sh,
        abstract_opt_state=sharding_lib.abstract_with_shardings(abstract_opt_state, opt_sh),
        init_opt=jax.jit(tx.init, out_shardings=opt_sh),
        train_step=make_train_step(model.graphdef, tx, c.schedule_fn(), c.grad_accum_steps,
                                   mesh=mesh, state_shardings=state_sh, rules=rules))


def _programs(model_name: str, model_config: Any, c: TrainConfig,
              mesh_config: sharding_lib.MeshConfig):
    mesh = sharding_lib.make_mesh(mesh_config)
    model = _model_programs(model_name, model_config, c.seed, mesh, mesh_config.rules)
    # Fields that do not enter the compiled step are reset in the cache key, so runs that
    # differ only in how often they log, evaluate or save share one compilation.
    step_config = dataclasses.replace(
        c, eval_every=0, eval_batches=None, checkpoint_every=0, keep_checkpoints=1,
        async_checkpointing=True, log_every=1)
    return mesh, model, _train_programs(model, step_config, mesh, mesh_config.rules)


def _resolve_model_config(model_name: str, model_config: Any) -> Any:
    config_cls, _ = registry.lookup(model_name)
    model_config = model_config if model_config is not None else config_cls()
    if not isinstance(model_config, config_cls):
        raise ValueError(f"model {model_name!r} needs a {config_cls.__name__}, "
                         f"got {type(model_config).__name__}")
    return model_config


def init_train_state(model_name: str, model_config: Any, train_config: TrainConfig, *,
                     mesh_config: sharding_lib.MeshConfig | None = None
                     ) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, a fresh sharded TrainState) for stepping a model by hand with
    make_train_step, e.g. in a notebook."""
    model_config = _resolve_model_config(model_name, model_config)
    _, model, prog = _programs(model_name, model_config, train_config,
                               mesh_config or sharding_lib.MeshConfig())
    params, rest = model.init()
    step = jax.device_put(jnp.zeros((), jnp.int32), prog.state_shardings.step)
    return model.graphdef, TrainState(params=params, opt_state=prog.init_opt(params),
                                      step=step, model_state=rest)


def train(model_name: str, model_config: Any, train_config: TrainConfig,
          train_iter: Iterator[Batch], eval_iter_fn: Callable[[], Iterable[Batch]] | None,
          workdir: str | os.PathLike, *,
          mesh_config: sharding_lib.MeshConfig | None = None,
          bytes_fn: Callable[[Batch], int] = default_bytes_fn,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Trains model `model_name` (models.registry) in `workdir`, resuming if it has checkpoints.

    train_iter: yields batches (dicts of int32 [B, T] arrays, keys BATCH_KEYS) and has
      get_state()/set_state(state) (a grain DatasetIterator or anything with that contract).
    eval_iter_fn: returns a fresh iterable of eval batches each call (None: no eval).
    model_config: None means the model's config class with its gin bindings.
    mesh_config: device mesh (default MeshConfig(): data parallel over all devices).
    bytes_fn: UTF-8 bytes a batch's scored targets stand for (for bits per byte).
    on_step: called after every step with (step, scalars: loss, lr, grad_norm, ...).

    Saves every checkpoint_every steps and at the end (and on SIGTERM, then returns with
    preempted=True); evaluates every eval_every steps and at the end. Raises ValueError if the
    workdir holds another architecture's checkpoints (before writing anything) and
    NonFiniteLossError naming the step if a loss goes non-finite (the bad state is not saved).

    Returns {"step", "start_step", "losses" (this call's steps), "eval" (last eval metrics:
    loss, perplexity, bits_per_byte, tokens, bytes, batches), "evals" ({step: metrics}),
    "preempted", "num_params", "workdir"}.
    """
    c = train_config
    model_config = _resolve_model_config(model_name, model_config)
    workdir = os.path.abspath(os.fspath(workdir))
    mesh_config = mesh_config or sharding_lib.MeshConfig()
    mesh, model, prog = _programs(model_name, model_config, c, mesh_config)
    ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=c.keep_checkpoints,
                                       async_save=c.async_checkpointing)
    logger = None
    try:
        # Refuse a foreign workdir before computing or writing anything.
        ckpt.check_compatible(model_name, model_config, model.abstract_params)
        restored = ckpt.restore(model.abstract_params, prog.abstract_opt_state,
                                abstract_model_state=model.abstract_rest,
                                with_data=True, quarantine_corrupt=True)
        if restored is None:
            params, rest = model.init()
            start_step, opt_state = 0, prog.init_opt(params)
        else:
            start_step, params, opt_state = restored.step, restored.params, restored.opt_state
            rest = restored.model_state
            if restored.data_state is not None:
                train_iter.set_state(restored.data_state)
            log.info("resumed %s from step %d", workdir, start_step)
        state = TrainState(params=params, opt_state=opt_state, step=jax.device_put(
            jnp.asarray(start_step, jnp.int32), prog.state_shardings.step), model_state=rest)

        logger = MetricsLogger(workdir, total_steps=c.steps, start_step=start_step,
                               progress=progress)
        losses: list[float] = []
        evals: dict[int, dict[str, float]] = {}
        last_saved = start_step if restored is not None else None

        def run_eval(step: int) -> None:
            if eval_iter_fn is None:
                return
            evals[step] = evaluate(
                model.eval_step, state.params, state.model_state, eval_iter_fn(),
                batch_sharding=sharding_lib.batch_sharding(mesh, mesh_config.rules),
                bytes_fn=bytes_fn, max_batches=c.eval_batches)
            logger.log_eval(step, evals[step])

        def finish(pending) -> None:
            # Reading a step's metrics one step late lets the host queue the next step first.
            step, metrics, tokens = pending
            metrics = jax.device_get(metrics)
            if not metrics.pop("finite"):
                saved = ("no checkpoint was written" if last_saved is None else
                         f"the last good checkpoint is step {last_saved} in {ckpt.directory}")
                raise NonFiniteLossError(
                    f"non-finite training at step {step}: loss={float(metrics['loss'])}, "
                    f"grad_norm={float(metrics['grad_norm'])}; stopped without saving this "
                    f"state ({saved})")
            losses.append(float(metrics["loss"]))
            logger.log_step(step, metrics, tokens,
                              write=step % c.log_every == 0 or step == c.steps)
            if on_step is not None:
                on_step(step, {k: float(v) for k, v in metrics.items() if k != "model"})

        def save(step: int) -> None:
            nonlocal last_saved
            if step != last_saved:
                ckpt.save(step, state.params, state.opt_state, train_iter.get_state(),
                          model_state=state.model_state,
                          model_name=model_name, model_config=model_config,
                          extra={"train_config": dataclasses.asdict(c)})
                last_saved = step

        step, pending, preempted, batch_sh = start_step, None, False, None
        with _StopOnSignal() as stop:
            while step < c.steps:
                if stop.requested:
                    preempted = True
                    break
                try:
                    batch = next(train_iter)
                except StopIteration:
                    log.warning("the training iterator ran out after step %d of %d", step,
                                c.steps)
                    break
                _check_batch(batch)
                if batch_sh is None:
                    batch_sh = sharding_lib.batch_sharding(mesh, mesh_config.rules,
                                                           np.shape(batch["inputs"])[0])
                state, metrics = prog.train_step(state,
                                                 sharding_lib.shard_batch(batch, batch_sh))
                step += 1
                if pending is not None:
                    finish(pending)
                pending = (step, metrics, int(np.size(batch["inputs"])))
                at_eval = c.eval_every and step % c.eval_every == 0 and step < c.steps
                at_save = c.checkpoint_every and step % c.checkpoint_every == 0
                if at_eval or at_save:
                    finish(pending)   # never save or report a state not known to be finite
                    pending = None
                    if at_save:
                        save(step)
                    if at_eval:
                        run_eval(step)
            if pending is not None:
                finish(pending)
            save(step)
        if not preempted and step not in evals:
            run_eval(step)
        return {"step": step, "start_step": start_step, "losses": losses,
                "eval": evals[max(evals)] if evals else {}, "evals": evals,
                "preempted": preempted, "workdir": workdir,
                "num_params": int(sum(x.size for x in jax.tree.leaves(model.abstract_params)))}
    finally:
        if logger is not None:
            logger.close()
        ckpt.close()   # waits for the last asynchronous save to commit
