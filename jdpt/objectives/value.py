"""DPOK's learned value function ``V(x_t, c, t)``: the baseline of its policy gradient.

DPOK (Fan et al., "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models",
NeurIPS 2023; google-research/dpok ``train_online_pg.py``, ``reward_model.py ValueMulti``) uses
the advantage ``A = r - V(x_t, c, t)`` of each sampler transition, ``r`` the final image's
reward, with ``V`` a small network on the flattened latent ``x_t``, a text embedding ``c`` and the
step index ``t``, regressed onto the final reward by MSE with its own optimizer (AdamW, lr 1e-4,
256 transitions per update, 5 accumulated mini-batches per online iteration).

In the one training loop the value net lives in the policy's train state:
``DPOK(baseline="value", value=ValueBaseline(...))`` keeps its params and AdamW state in
``aux["value"]`` and, in each online iteration, trains it on the rollout before computing the
advantages (:class:`ValueBaseline`). The pieces also compose by hand: ``make_train_step(
ValueRegression(), optax.adamw(1e-4), mesh, model=value_net)`` trains a separate value net on
:func:`value_batch` rows, and :func:`value_advantages` gives ``A = r - V`` ``[B, K]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdpt.parallel.step import Frozen

Array = jax.Array
Metrics = dict[str, Array]


class _StepScaledLinear(nnx.Module):
    """dpok ``ConditionalLinear``: ``(x W + b) * gamma[step]``, ``gamma`` ``[num_steps, out]``
    drawn from U[0, 1), ``W`` Xavier-normal."""

    def __init__(self, d_in: int, d_out: int, num_steps: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.xavier_normal(), rngs=rngs)
        self.gamma = nnx.Param(jax.random.uniform(rngs.params(), (num_steps, d_out)))

    def __call__(self, x: Array, step: Array) -> Array:
        return self.linear(x) * self.gamma[...][step]


class ValueNet(nnx.Module):
    """DPOK's value network (dpok ``ValueMulti``): ``concat(flatten(x_t), text)`` through
    ``depth`` step-scaled linear layers of width ``hidden`` with ReLU, then a linear layer to a
    scalar. Defaults are dpok's (3 layers of 256, 50 sampler steps).

    Args:
        state_size: number of elements of one state ``x_t`` (dpok: 4 x 64 x 64 SD latents).
        text_size: width of the text embedding (dpok: 768, the reward model's CLIP ViT-L/14 text
            features; the Shapes world: e.g. the pooled prompt embedding).
        num_steps: sampler steps (the step index ``t`` is in ``[0, num_steps)``).
    """

    def __init__(self, state_size: int, text_size: int, num_steps: int = 50, hidden: int = 256,
                 depth: int = 3, *, rngs: nnx.Rngs):
        if min(state_size, num_steps, hidden, depth) < 1 or text_size < 0:
            raise ValueError(f"ValueNet needs positive sizes; got state_size={state_size}, text_size={text_size}, "
                             f"num_steps={num_steps}, hidden={hidden}, depth={depth}")
        self.state_size, self.text_size, self.num_steps = state_size, text_size, num_steps
        sizes = [state_size + text_size] + [hidden] * depth
        self.layers = nnx.List([_StepScaledLinear(a, b, num_steps, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.xavier_normal(), rngs=rngs)

    def __call__(self, x_t: Array, text: Array, step: Array) -> Array:
        """``x_t``: ``[B, ...]`` states; ``text``: ``[B, text_size]``; ``step``: ``[B]`` int step
        indices. Returns ``[B]`` fp32 values."""
        b = x_t.shape[0]
        if x_t.size != b * self.state_size or text.shape != (b, self.text_size) or step.shape != (b,):
            raise ValueError(f"ValueNet(state_size={self.state_size}, text_size={self.text_size}) got x_t "
                             f"{tuple(x_t.shape)}, text {tuple(text.shape)}, step {tuple(step.shape)}; expected "
                             f"[B, ...] with {self.state_size} elements per row, [B, {self.text_size}], [B]")
        h = jnp.concatenate([x_t.reshape(b, -1), text.astype(x_t.dtype)], axis=1).astype(jnp.float32)
        for layer in self.layers:
            h = jax.nn.relu(layer(h, step))
        return self.out(h)[:, 0]


def value_batch(batch: dict[str, Any], rewards: Array, text: Array) -> dict[str, Array]:
    """A rollout's transitions as value-regression rows (row ``b K + k`` = sample ``b``, step ``k``).

    Args:
        batch: a DDPO/DPOK rollout batch (``x_t`` ``[B, K, ...]``, recorded in step order).
        rewards: ``[B]`` final rewards; text: ``[B, D]`` per-sample text embeddings.
    Returns:
        ``{"x_t": [B K, ...], "text": [B K, D], "step": [B K] int32, "reward": [B K] fp32}``.
    """
    x_t = jnp.asarray(batch["x_t"])
    b, k = x_t.shape[:2]
    rewards, text = jnp.asarray(rewards, jnp.float32), jnp.asarray(text)
    if rewards.shape != (b,) or text.ndim != 2 or text.shape[0] != b:
        raise ValueError(f"value_batch needs rewards [B] and text [B, D] for B = {b} samples; got rewards "
                         f"{tuple(rewards.shape)}, text {tuple(text.shape)}")
    return {"x_t": x_t.reshape(b * k, *x_t.shape[2:]), "text": jnp.repeat(text, k, axis=0),
            "step": jnp.tile(jnp.arange(k, dtype=jnp.int32), b), "reward": jnp.repeat(rewards, k)}


def value_loss(value: ValueNet, rows: dict[str, Array]) -> tuple[Array, Metrics]:
    """dpok ``_train_value_func``: ``mean((V(x_t, text, step) - reward)²)`` over ``rows`` (a
    :func:`value_batch`). Returns ``(loss, {"value": mean V})``."""
    v = value(rows["x_t"], rows["text"], rows["step"])
    return jnp.mean((v - rows["reward"].astype(jnp.float32)) ** 2), {"value": jnp.mean(v)}


@dataclasses.dataclass(frozen=True)
class ValueRegression:
    """The value net's objective for ``make_train_step`` (model = a :class:`ValueNet`; batch = a
    :func:`value_batch`). dpok's optimizer: AdamW, lr 1e-4, 256 rows per mini-batch."""

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Array],
             key: Array) -> tuple[Array, Metrics]:
        return value_loss(frozen.model(params), batch)


def value_advantages(value: ValueNet, batch: dict[str, Any], rewards: Array, text: Array) -> Array:
    """DPOK's advantages ``A[b, k] = r[b] - V(x_t[b, k], text[b], k)`` ``[B, K]`` fp32, without
    gradient, for ``batch["advantages"]`` of a ``DPOK(baseline="value")`` update (``batch``: the
    rollout batch with all ``K`` transitions in step order). Pure: jit it."""
    rows = value_batch(batch, rewards, text)
    v = jax.lax.stop_gradient(value(rows["x_t"], rows["text"], rows["step"]))
    b, k = jnp.shape(batch["x_t"])[:2]
    return (rows["reward"] - v).reshape(b, k)


@functools.lru_cache(maxsize=None)
def _value_graph(state_size: int, text_size: int, num_steps: int, hidden: int, depth: int) -> nnx.GraphDef:
    model = nnx.eval_shape(lambda: ValueNet(state_size, text_size, num_steps, hidden, depth, rngs=nnx.Rngs(0)))
    return nnx.graphdef(model)


@dataclasses.dataclass(frozen=True)
class ValueBaseline:
    """DPOK's value net inside the policy's train state (``aux["value"]``: its params and AdamW
    state), so that one checkpoint holds both networks and a resumed run continues both.

    Per online iteration (:meth:`DPOK.advantages <jdpt.objectives.ddpo.DPOK.advantages>`), as the
    reference orders it: ``updates`` AdamW steps of :func:`value_loss` on the rollout's transitions
    (dpok trains ``V`` before the policy), then ``A = r - V(x_t, c, t)`` per transition.

    Attributes:
        state_size, text_size, num_steps, hidden, depth: the :class:`ValueNet`.
        text: ``text(model, cond) -> [B, text_size]``, the value net's text features of the
            conditions, computed at rollout time (dpok: the reward model's CLIP text features;
            e.g. the pooled prompt embedding).
        learning_rate: dpok's AdamW rate (1e-4).
        updates: value steps per rollout (jdpt's default 1; dpok accumulates 5 mini-batches of 256
            transitions drawn from its replay buffer).
        seed: the value net's initialisation.
    """

    state_size: int
    text_size: int
    text: Any
    num_steps: int = 50
    hidden: int = 256
    depth: int = 3
    learning_rate: float = 1e-4
    updates: int = 1
    seed: int = 0

    def __post_init__(self):
        if not callable(self.text):
            raise ValueError("ValueBaseline.text must be a function text(model, cond) -> [B, text_size]")
        if self.updates < 1 or self.learning_rate <= 0:
            raise ValueError(f"ValueBaseline needs updates >= 1 and learning_rate > 0; got {self.updates}, "
                             f"{self.learning_rate}")

    def _optimizer(self) -> optax.GradientTransformation:
        return optax.adamw(self.learning_rate)

    def net(self, params: nnx.State) -> ValueNet:
        return nnx.merge(_value_graph(self.state_size, self.text_size, self.num_steps, self.hidden, self.depth),
                         params)

    def init(self) -> dict[str, Any]:
        """``{"params", "opt_state"}`` of a fresh value net."""
        net = ValueNet(self.state_size, self.text_size, self.num_steps, self.hidden, self.depth,
                       rngs=nnx.Rngs(self.seed))
        params = nnx.state(net)
        return {"params": params, "opt_state": self._optimizer().init(params)}

    def fit(self, state: dict[str, Any], rows: dict[str, Array]) -> tuple[dict[str, Any], Metrics]:
        """``updates`` AdamW steps of :func:`value_loss` on ``rows`` (:func:`value_batch`)."""
        optimizer = self._optimizer()

        def one(state, _):
            (loss, metrics), grads = jax.value_and_grad(
                lambda p: value_loss(self.net(p), rows), has_aux=True)(state["params"])
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

        state, losses = jax.lax.scan(one, state, None, length=self.updates)
        return state, {"value_loss": losses[-1]}
