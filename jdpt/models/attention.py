"""The single attention entry point used by every model in jdpt.

Every attention layer of every model calls :func:`attention` with an :class:`AttentionPlan`.
The plan says *how* the call is computed; guidance methods (PAG, SoftPAG/HeadHunter, ...) are
plans handed to the model, not forks of model code:

- ``impl``: which implementation runs the call (``"xla"`` is always available; accelerated
  kernels register themselves under other names with :func:`register_implementation`).
- ``head_weight`` (``u``): per-head perturbation weight. The output becomes
  ``(1 - u) * softmax(q k^T * scale) v + u * v`` (SoftPAG); ``u = 1`` on every head of a layer is
  PAG's identity attention, ``u = 0`` is plain attention.
- ``return_probs``: also return the head-averaged attention probabilities ``[B, T, S]``.

Models address layers by stable names (the diffusers module path of the attention module, e.g.
``"transformer_blocks.0.attn"``) and take a :class:`LayerPlans`: a default plan plus per-layer
overrides. Layers asked for probabilities store them with ``module.sow(nnx.Intermediate,
"attn_probs", ...)``; collect them with ``out, probs = nnx.capture(model, nnx.Intermediate)(...)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

Array = jax.Array


@struct.dataclass
class AttentionPlan:
    """How one attention call is computed.

    Attributes:
        head_weight: optional SoftPAG weight ``u`` per head, shape ``[H]`` or ``[B, H]``
            (traced: changing values does not recompile). Requires self-attention (T == S).
        impl: name of a registered implementation (static).
        return_probs: also return head-averaged probabilities ``[B, T, S]`` (static).
    """

    head_weight: Array | None = None
    impl: str = struct.field(pytree_node=False, default="xla")
    return_probs: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class LayerPlans:
    """A default :class:`AttentionPlan` plus overrides keyed by layer name.

    The set of names is static (part of the pytree structure); the arrays inside the plans are
    traced. Build one with :func:`plan_layers` to select layers by regular expression.
    """

    default: AttentionPlan = AttentionPlan()
    layers: Mapping[str, AttentionPlan] = struct.field(default_factory=dict)

    def for_layer(self, name: str) -> AttentionPlan:
        return self.layers.get(name, self.default)


def plan_layers(
    names: Iterable[str],
    pattern: str,
    plan: AttentionPlan,
    *,
    default: AttentionPlan | None = None,
) -> LayerPlans:
    """Give ``plan`` to every layer in ``names`` whose name fully matches the regex ``pattern``.

    ``names`` is a model's ``attention_layer_names()``. Raises if nothing matches, so a typo in a
    layer pattern cannot silently turn guidance off.
    """
    names = list(names)
    chosen = [n for n in names if re.fullmatch(pattern, n)]
    if not chosen:
        raise ValueError(
            f"layer pattern {pattern!r} matches no attention layer; "
            f"the model's layers are: {names}"
        )
    return LayerPlans(
        default=default if default is not None else AttentionPlan(),
        layers={n: plan for n in chosen},
    )


def resolve_plan(plans: LayerPlans | AttentionPlan | None, name: str) -> AttentionPlan:
    """The plan a layer called ``name`` should use (``None`` means the default XLA plan)."""
    if plans is None:
        return AttentionPlan()
    if isinstance(plans, AttentionPlan):
        return plans
    return plans.for_layer(name)


AttentionFn = Callable[..., tuple[Array, Array | None]]
_IMPLEMENTATIONS: dict[str, AttentionFn] = {}


def register_implementation(name: str, fn: AttentionFn) -> None:
    """Register an attention implementation under ``name`` (used by ``jdpt.kernels``).

    ``fn(q, k, v, *, head_weight, bias, mask, is_causal, scale, return_probs)`` must return
    ``(out, probs_or_None)`` with the semantics of :func:`xla_attention`.
    """
    _IMPLEMENTATIONS[name] = fn


def available_implementations() -> list[str]:
    return sorted(_IMPLEMENTATIONS)


def xla_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    head_weight: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_probs: bool = False,
) -> tuple[Array, Array | None]:
    """Plain-XLA attention; the reference semantics for every implementation.

    Logits, masking and softmax run in fp32; probabilities are cast to ``v``'s dtype before the
    value product (as in ``jax.nn.dot_product_attention``).
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    # Head-major operands: one transpose each, then plain batched matmuls (measured faster on
    # CPU, forward and backward, than contracting the [B, T, H, D] layout directly).
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    keep = None
    if mask is not None:
        keep = mask.astype(bool)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
        keep = causal if keep is None else jnp.logical_and(keep, causal)
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v)
    avg = probs.mean(axis=1) if return_probs else None
    if head_weight is not None:
        u = _head_weight(head_weight, q.shape[0], q.shape[1])  # [B, H, 1, 1]
        out = ((1.0 - u) * out.astype(jnp.float32) + u * v.astype(jnp.float32)).astype(out.dtype)
        if return_probs:  # the map actually used, (1-u)A + uI, averaged over heads
            u = u[:, :, 0, 0]
            eye = jnp.eye(q.shape[2], k.shape[2], dtype=jnp.float32)
            avg = jnp.einsum("bh,bhts->bts", 1.0 - u, probs) / q.shape[1] + u.mean(axis=1)[:, None, None] * eye
    return out.transpose(0, 2, 1, 3), avg


register_implementation("xla", xla_attention)


def _head_weight(u: Array, batch: int, heads: int) -> Array:
    """Broadcast ``u`` ([H] or [B, H]) to ``[B, H, 1, 1]`` in fp32 (head-major layout)."""
    u = jnp.asarray(u, jnp.float32)
    if u.ndim == 1:
        u = jnp.broadcast_to(u[None], (batch, u.shape[0]))
    if u.shape != (batch, heads):
        raise ValueError(
            f"head_weight must have shape [H] = [{heads}] or [B, H] = [{batch}, {heads}]; "
            f"got {tuple(u.shape)}"
        )
    return u[:, :, None, None]


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    plan: AttentionPlan | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Array, Array | None]:
    """Multi-head attention, computed as ``plan`` says.

    Args:
        q: ``[B, T, H, D]`` queries.
        k, v: ``[B, S, H, D]`` keys and values.
        plan: :class:`AttentionPlan`; ``None`` is plain XLA attention.
        bias: additive logit bias broadcastable to ``[B, H, T, S]`` (e.g. T5's relative bias).
        mask: boolean mask broadcastable to ``[B, H, T, S]``; ``True`` = attend.
        is_causal: query i attends keys j <= i (top-left aligned when T != S, as PyTorch and
            ``jax.nn.dot_product_attention``).
        scale: logit scale; defaults to ``1/sqrt(D)``.

    Returns:
        ``(out, probs)``: ``out`` is ``[B, T, H, D]`` in ``v``'s dtype; ``probs`` is the
        head-averaged ``[B, T, S]`` fp32 probability map when ``plan.return_probs``, else None.
    """
    plan = AttentionPlan() if plan is None else plan
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q, k, v as [B, T, H, D]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            "attention shapes disagree: q [B, T, H, D], k and v [B, S, H, D] required; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if plan.head_weight is not None and q.shape[1] != k.shape[1]:
        raise ValueError(
            "head_weight (SoftPAG/PAG perturbation) needs self-attention (T == S); this call has "
            f"T={q.shape[1]} queries and S={k.shape[1]} keys. Perturb self-attention layers only."
        )
    try:
        fn = _IMPLEMENTATIONS[plan.impl]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {plan.impl!r}; available: "
            f"{available_implementations()}"
        ) from None
    return fn(
        q,
        k,
        v,
        head_weight=plan.head_weight,
        bias=bias,
        mask=mask,
        is_causal=is_causal,
        scale=scale,
        return_probs=plan.return_probs,
    )


def sow_probs(module: nnx.Module, probs: Array | None) -> None:
    """Store a layer's head-averaged probabilities as ``nnx.Intermediate`` ``"attn_probs"``."""
    if probs is not None:
        module.sow(nnx.Intermediate, "attn_probs", probs)


def attention_layer_names(model: nnx.Module) -> list[str]:
    """Stable names of every attention layer of ``model`` (in graph order, sorted by path).

    An attention module declares its name as the string attribute ``layer_name`` (its diffusers
    module path, e.g. ``"transformer_blocks.0.attn"``); plans are addressed by these names.
    """
    return [
        node.layer_name
        for _, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "layer_name", None), str)
    ]
