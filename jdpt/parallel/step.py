"""Train steps: an objective's loss turned into one sharded, jitted update (and its pmap twin).

An objective (DESIGN principle 6) is anything with
``loss(params, frozen, batch, key) -> (scalar, metrics)``: ``params`` are the trainable
variables, ``frozen`` a :class:`Frozen` with everything else the loss may read (the model's
graph and non-trainable variables, the objective's reference or reward models). The loss
rebuilds the model with ``frozen.model(params)`` (``nnx.merge`` inside), so

- a LoRA policy is ``trainable="lora"``: ``params`` are the adapters, the base weights sit in
  ``frozen.rest``, and the reference "base without adapters" is
  ``frozen.model(jax.tree.map(jnp.zeros_like, params))`` (a zero adapter adds exactly 0), with
  no second copy of the weights;
- a separate reference / reward model travels in ``frozen.extra``;
- what the objective changes during training besides the params (DiffusionNFT's old policy, an
  EMA, DDPO's per-prompt stat tracker, DPOK's value net and its optimizer state) is the train
  state's ``aux``: the objective's optional ``init_aux(params)`` makes it, the loss reads it as
  ``frozen.aux`` (no gradient), and the objective's optional ``update_aux(aux, params, step)``
  moves it after every optimizer update, inside the same jitted step. ``jdpt.train.fit``
  checkpoints it with the params, so a resumed run continues it bit for bit.

:func:`make_train_step` returns ``(init_state, step)``: ``init_state(model, extra=None,
aux=None)`` places a :class:`TrainState` on the mesh by the rules table, ``step(state, batch, key) ->
(state, metrics)`` is one ``jax.jit`` with in/out shardings that donates the trainable part of
the state. :func:`pmap_step` gives the same update under ``jax.pmap``.

Frozen arrays live in ``state.frozen`` but are handed to the compiled update as a separate
argument that is neither donated nor returned: they are never updated or copied, and arrays the
caller still holds (the base model a LoRA was added to) stay valid.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdpt.parallel.mesh import (DEFAULT_RULES, Rules, batch_axes, batch_sharding, batch_shards,
                                check_batch, compute_rules, param_shardings, shard_params)

Batch = Any  # a pytree of arrays, every leaf with the batch dimension first
Metrics = dict[str, jax.Array]
Step = Callable[["TrainState", Batch, jax.Array], tuple["TrainState", Metrics]]
PMAP_AXIS = "devices"


@struct.dataclass
class Frozen:
    """What a loss reads but never trains.

    Attributes:
        graphdef: the model's graph (static).
        rest: the model's variables outside the trainable filter (with ``trainable="lora"``:
            the base weights).
        extra: the objective's own frozen pieces, any pytree (e.g. ``{"reference": nnx.State}``);
            ``nnx.Variable`` leaves are placed by the rules table, other arrays replicated.
        compute_dtype: the dtype the step computes in (static; ``None``: the stored dtypes).
            Inside the loss, ``params``, ``rest``, ``extra`` and ``aux`` are already in it.
        aux: inside the loss, the train state's ``aux`` (the objective's training-time state,
            without gradient); None outside the step.
    """

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    rest: nnx.State
    extra: Any = None
    compute_dtype: Any = struct.field(pytree_node=False, default=None)
    aux: Any = None

    def model(self, params: nnx.State) -> nnx.Module:
        """The model with trainable variables ``params``."""
        return nnx.merge(self.graphdef, params, self.rest)

    def cast(self, tree: Any) -> Any:
        """``tree``'s floating arrays in the compute dtype (model inputs); unchanged without one."""
        return _cast(tree, self.compute_dtype)


@struct.dataclass
class TrainState:
    """Step counter, trainable params (fp32 master copy), optimizer state, the frozen rest and the
    objective's ``aux`` state (module docstring; None for objectives without one).

    Under :func:`pmap_step` every array has a leading device axis (identical replicas).
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    frozen: Frozen | None
    aux: Any = None


class Objective(Protocol):
    """A post-training objective: its loss (a mean over the batch) and metrics. It may also have
    ``init_aux(params) -> aux`` and ``update_aux(aux, params, step) -> aux`` (module docstring)."""

    def loss(self, params: nnx.State, frozen: Frozen, batch: Batch,
             key: jax.Array) -> tuple[jax.Array, Metrics]: ...


def _aux_rules(objective: Objective) -> tuple[Callable | None, Callable | None]:
    init, update = getattr(objective, "init_aux", None), getattr(objective, "update_aux", None)
    return (init if callable(init) else None), (update if callable(update) else None)


@dataclasses.dataclass(frozen=True)
class _Settings:
    micro_batches: int
    compute_dtype: Any
    clip_norm: float | None
    remat: bool | Callable

    def __post_init__(self):
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches} must be >= 1")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be > 0 (or None: no clipping)")
        if not (isinstance(self.remat, bool) or callable(self.remat)):
            raise ValueError(f"remat={self.remat!r}: use False, True or a jax.checkpoint_policies policy")


def _cast(tree: Any, dtype) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


_FILTERS = {"all": nnx.Param, "lora": nnx.LoRAParam}


def _split(model: nnx.Module, trainable) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``graphdef, trainable params, rest`` of ``model``; ``trainable`` is "all", "lora" or a filter."""
    wrt = _FILTERS.get(trainable, trainable) if isinstance(trainable, str) else trainable
    graphdef, params, rest = nnx.split(model, wrt, ...)
    if not jax.tree.leaves(params):
        hint = "; add adapters with jdpt.models.lora.add_lora first" if trainable == "lora" else ""
        raise ValueError(f"trainable={trainable!r} selects no parameter of {type(model).__name__}{hint}")
    return graphdef, params, rest


def _check_structure(model: nnx.Module, trainable, graphdef: nnx.GraphDef):
    state_graphdef, params, rest = _split(model, trainable)
    if state_graphdef != graphdef:
        raise ValueError(
            f"init_state got a {type(model).__name__} whose structure differs from the model the "
            "step was built for (other config or LoRA layout); build the step with this model"
        )
    return params, rest


def _update(objective: Objective, optimizer: optax.GradientTransformation, cfg: _Settings,
            state: TrainState, frozen: Frozen, batch: Batch, key: jax.Array, *,
            gather: Callable[[Any], Any] = lambda tree: tree,
            micro_sharding: NamedSharding | None = None, axis_name: str | None = None):
    """One optimizer update: micro-batch gradients (lax.scan) averaged, optionally averaged
    over ``axis_name`` (pmap), clipped, applied. ``gather`` puts weights in their compute layout."""
    m = cfg.micro_batches
    frozen = _cast(gather(frozen.replace(aux=jax.lax.stop_gradient(state.aux))), cfg.compute_dtype)

    def loss_fn(params, micro, k):
        loss, metrics = objective.loss(_cast(gather(params), cfg.compute_dtype), frozen, micro, k)
        return loss.astype(jnp.float32), {**metrics, "loss": loss}

    if cfg.remat is not False:
        loss_fn = jax.checkpoint(loss_fn, policy=None if cfg.remat is True else cfg.remat)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def split(x):
        # [B, ...] -> [m, B/m, ...]; micro-batch i takes rows i, i+m, ..., so every device keeps
        # its own rows (no communication).
        x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
        return x if micro_sharding is None else jax.lax.with_sharding_constraint(x, micro_sharding)

    def accumulate(total, xs):
        i, micro = xs
        grads, metrics = grad_fn(state.params, micro, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, grads), metrics

    if m == 1:  # no loop around the model: XLA:CPU runs convolutions inside a while loop ~3x slower
        grads, metrics = grad_fn(state.params, batch, jax.random.fold_in(key, 0))
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, metrics = jax.lax.scan(accumulate, zeros, (jnp.arange(m), jax.tree.map(split, batch)))
        grads = jax.tree.map(lambda g: g / m, grads)
        metrics = jax.tree.map(lambda x: x.mean(axis=0), metrics)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    grad_norm = optax.tree.norm(grads)
    if cfg.clip_norm is not None:
        scale = jnp.minimum(1.0, cfg.clip_norm / grad_norm)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux = state.aux
    _, update_aux = _aux_rules(objective)
    if update_aux is not None:
        aux = update_aux(aux, params, state.step)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, aux=aux)
    return new, {**metrics, "grad_norm": grad_norm}


def _initial_aux(objective: Objective, params: nnx.State, aux: Any, shardings: Any) -> Any:
    """The objective's ``aux`` at step 0 (``aux`` if given, else ``init_aux(params)``), as fresh
    buffers (the step donates it) placed by ``shardings`` (None: left where it is)."""
    init_aux, _ = _aux_rules(objective)
    if aux is None and init_aux is not None:
        aux = init_aux(params)
    if aux is None:
        return None
    if init_aux is not None:
        want, got = jax.tree.structure(jax.eval_shape(init_aux, params)), jax.tree.structure(aux)
        if want != got:
            raise ValueError(f"init_state got aux of structure {got}; {type(objective).__name__}.init_aux "
                             f"makes {want}")
    aux = jax.tree.map(jnp.copy, aux)
    return aux if shardings is None else jax.device_put(aux, shardings)


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    model: nnx.Module,
    trainable: str | Any = "all",
    rules: Rules | str = DEFAULT_RULES,
    micro_batches: int = 1,
    compute_dtype=None,
    clip_norm: float | None = None,
    remat: bool | Callable = False,
) -> tuple[Callable[..., TrainState], Step]:
    """A sharded train step for ``objective``.

    Args:
        objective: has ``loss(params, frozen, batch, key) -> (scalar, metrics)``.
        optimizer: an optax transformation (its state is sharded like the params).
        mesh: e.g. :func:`jdpt.parallel.make_mesh`; the batch is split over ``("data", "fsdp")``.
        model: gives the graph and the parameter shapes/axes (an ``nnx.eval_shape`` model works).
        trainable: ``"all"`` (every ``nnx.Param``), ``"lora"`` (``nnx.LoRAParam`` adapters) or an
            nnx filter; everything else is frozen.
        rules: logical-axis rules, a preset name of ``jdpt.parallel.RULES`` or a table. Params
            and optimizer state are stored split by them; for the forward/backward the params
            are gathered whole along ``fsdp`` (:func:`jdpt.parallel.mesh.compute_rules`).
        micro_batches: gradient accumulation: the batch is cut into this many micro-batches
            (micro-batch ``i`` = rows ``i, i+m, ...``; its loss gets ``fold_in(key, i)``) and
            their gradients and metrics averaged (for a mean loss: the full-batch gradient).
        compute_dtype: e.g. ``jnp.bfloat16``: params and frozen weights are cast for the
            forward/backward; the master params and the optimizer state stay in their dtype.
        clip_norm: clip the gradient to this global norm (``metrics["grad_norm"]`` is before).
        remat: ``True`` or a ``jax.checkpoint_policies`` policy: recompute the loss's
            activations in the backward pass.

    Returns:
        ``init_state(model, extra=None, aux=None) -> TrainState`` (``aux``: the objective's
        state, default ``objective.init_aux(params)``) and ``step(state, batch, key) ->
        (state, metrics)``; ``metrics`` holds the objective's metrics, ``loss`` and
        ``grad_norm``. ``step`` donates ``state`` (use the returned one). Pass batches as host
        arrays (one host) or from :func:`jdpt.parallel.shard_batch`. ``step.lower(state, batch,
        key)`` lowers the jitted update without running it (``.compile().memory_analysis()``);
        ``step.batch_sharding`` is the batch's ``NamedSharding``.
    """
    cfg = _Settings(micro_batches, compute_dtype, clip_norm, remat)
    graphdef, params, _ = _split(model, trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    init_aux, _ = _aux_rules(objective)
    shardings = TrainState(
        step=replicated,
        params=param_shardings(params, mesh, rules),
        opt_state=param_shardings(jax.eval_shape(optimizer.init, params), mesh, rules),
        frozen=None,
        aux=None if init_aux is None else param_shardings(jax.eval_shape(init_aux, params), mesh, rules),
    )
    micro = NamedSharding(mesh, PartitionSpec(None, batch_axes(mesh)))
    gathered = compute_rules(rules)

    def gather(tree):  # ZeRO-3: weights whole along "fsdp" for compute
        return jax.lax.with_sharding_constraint(tree, param_shardings(tree, mesh, gathered))

    update = jax.jit(
        functools.partial(_update, objective, optimizer, cfg, gather=gather, micro_sharding=micro),
        in_shardings=(shardings, None, batch_sharding(mesh), replicated),  # frozen: as placed
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    shards = batch_shards(mesh)

    def init_state(model: nnx.Module, extra: Any = None, aux: Any = None) -> TrainState:
        params, rest = _check_structure(model, trainable, graphdef)
        # Copies: the step donates them, the model's own arrays must stay valid. (An explicit
        # copy: device_put(..., may_alias=False) of a one-device array onto a replicated
        # sharding still reuses its buffer on jax 0.12.)
        params = jax.device_put(jax.tree.map(jnp.copy, params), shardings.params)
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
        frozen = Frozen(graphdef, shard_params(rest, mesh, rules),
                        None if extra is None else shard_params(extra, mesh, rules), compute_dtype)
        return TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state, frozen,
                          _initial_aux(objective, params, aux, shardings.aux))

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, Metrics]:
        check_batch(batch, micro_batches * shards,
                    f"micro_batches={micro_batches} x {shards} batch shards (data x fsdp)")
        new, metrics = update(state.replace(frozen=None), state.frozen, batch, key)
        return new.replace(frozen=state.frozen), metrics

    def lower(state: TrainState, batch: Batch, key: jax.Array) -> jax.stages.Lowered:
        """The compiled update's ahead-of-time stage for these arguments:
        ``step.lower(...).compile()`` gives ``memory_analysis()`` and ``cost_analysis()``."""
        return update.lower(state.replace(frozen=None), state.frozen, batch, key)

    step.lower = lower
    step.batch_sharding = batch_sharding(mesh)
    return init_state, step


def pmap_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    model: nnx.Module,
    trainable: str | Any = "all",
    micro_batches: int = 1,
    compute_dtype=None,
    clip_norm: float | None = None,
    remat: bool | Callable = False,
    devices: list[jax.Device] | None = None,
) -> tuple[Callable[..., TrainState], Step]:
    """:func:`make_train_step`'s update under ``jax.pmap`` over ``devices`` (default: local).

    The state is replicated (every array gets a leading device axis), ``step`` splits the batch
    ``[B, ...]`` into one shard per device and averages the gradients and metrics with
    ``lax.pmean``; device ``d`` computes its loss with ``fold_in(key, d)``. Returned metrics are
    the (identical) first replica's. Same arguments as :func:`make_train_step`.
    """
    cfg = _Settings(micro_batches, compute_dtype, clip_norm, remat)
    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    graphdef, _, _ = _split(model, trainable)

    def per_device(state, frozen, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(PMAP_AXIS))
        return _update(objective, optimizer, cfg, state, frozen, batch, key, axis_name=PMAP_AXIS)

    update = jax.pmap(per_device, PMAP_AXIS, in_axes=(0, 0, 0, None), donate_argnums=0, devices=devices)
    stacked = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))

    def replicate(tree):
        return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), stacked), tree)

    def init_state(model: nnx.Module, extra: Any = None, aux: Any = None) -> TrainState:
        params, rest = _check_structure(model, trainable, graphdef)
        frozen = Frozen(graphdef, replicate(rest), replicate(extra), compute_dtype)
        return TrainState(replicate(np.zeros((), np.int32)), replicate(params),
                          replicate(optimizer.init(params)), frozen,
                          replicate(_initial_aux(objective, params, aux, None)))

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, Metrics]:
        size = check_batch(batch, n * micro_batches, f"{n} devices x micro_batches={micro_batches}")
        batch = jax.tree.map(lambda x: x.reshape(n, size // n, *x.shape[1:]), batch)
        new, metrics = update(state.replace(frozen=None), state.frozen, batch, key)
        return new.replace(frozen=state.frozen), jax.tree.map(lambda x: x[0], metrics)

    return init_state, step
