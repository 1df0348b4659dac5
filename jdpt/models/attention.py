"""The single attention entry point used by every model in jdpt.

Every attention layer of every model calls :func:`attention` with an :class:`AttentionPlan`.
The plan says *how* the call is computed; guidance methods (PAG, SoftPAG/HeadHunter, ...) are
plans handed to the model, not forks of model code:

- ``impl``: which implementation runs the call (``"xla"`` and ``"xla_dense"`` are always
  available, see :func:`jdpt.models.attention_xla.xla_attention`; accelerated kernels register
  themselves under other names with :func:`register_implementation`, and the modules named in
  :data:`PLUGINS` are imported the first time a plan asks for their name: ``"pallas"`` loads
  :mod:`jdpt.kernels.attention`, so ``import jdpt`` never imports a kernel).
- ``head_weight`` (``u``): per-head perturbation weight. The output becomes
  ``(1 - u) * softmax(q k^T * scale) v + u * v`` (SoftPAG); ``u = 1`` on every head of a layer is
  PAG's identity attention, ``u = 0`` is plain attention.
- ``return_probs``: also return the head-averaged attention probabilities ``[B, T, S]``.
- ``query_blur`` (SEG) and ``joint_identity`` (MMDiT PAG) perturb the rows ``perturbed_rows`` of
  the batch before the implementation runs: the queries of the image tokens are Gaussian-blurred
  over their token grid, or the image-image block of the attention is masked to its diagonal.
  Both need the plan's ``grid`` (:class:`TokenGrid`: the grid size and where the image tokens
  lie in the sequence), since the attention call itself only sees a flat sequence.
- ``shared_reference`` (StyleAligned, :class:`SharedReference`): AdaIN of queries and keys
  towards each batch group's reference image and the reference's keys/values appended to every
  image's own (over the ``grid`` image tokens when given, else the whole sequence).

Models address layers by stable names (the diffusers module path of the attention module, e.g.
``"transformer_blocks.0.attn"``) and take a :class:`LayerPlans`: a default plan plus per-layer
overrides. Layers asked for probabilities store them with ``module.sow(nnx.Intermediate,
"attn_probs", ...)``; collect them with ``out, probs = nnx.capture(model, nnx.Intermediate)(...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jdpt.models.attention_xla import xla_attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """Where an attention call's image tokens lie in its sequence (static, hashable).

    The image tokens are ``height * width`` consecutive tokens in row-major order, either at the
    start of the sequence (``image_first=True``: UNet self-attention, SD3 joint attention
    ``[image, text]``) or at its end (``image_first=False``: Flux ``[text, image]``).
    """

    height: int
    width: int
    image_first: bool = True

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"TokenGrid needs a positive height and width; got {self.height}x{self.width}")

    @property
    def size(self) -> int:
        return self.height * self.width

    def start(self, length: int) -> int:
        """Index of the first image token in a sequence of ``length`` tokens."""
        if self.size > length:
            raise ValueError(
                f"TokenGrid {self.height}x{self.width} has {self.size} image tokens but the attention "
                f"sequence has only {length}; give the plan this layer's token grid"
            )
        return 0 if self.image_first else length - self.size


ADAIN_EPS = 1e-5  # StyleAligned: added to the variance of the AdaIN statistics (sa_handler.py)


@struct.dataclass
class SharedReference:
    """StyleAligned's shared self-attention (Hertz et al., "Style Aligned Image Generation via
    Shared Attention", CVPR 2024; google/style-aligned ``sa_handler.py``).

    The batch is ``groups`` equal chunks (2 with CFG: ``[uncond 0..n-1, cond 0..n-1]``); row 0 of
    each chunk is that chunk's reference image. On the image tokens (the plan's ``grid``; every
    token when the plan has none) of every non-reference row:

    - AdaIN of queries and keys per head and channel over the image tokens:
      ``(x - mu_x) / sigma_x * sigma_ref + mu_ref``, ``sigma = sqrt(var + 1e-5)`` with the
      unbiased variance (``torch.var``'s default, as the reference); values are not normalised;
    - the reference's image keys (times ``score_scale``) and values are appended to the image's
      keys and values; image queries attend to them with the logit bias ``score_shift``.

    Reference rows are left exactly as plain attention: in the reference code they attend to a
    duplicate of their own keys, which leaves ``softmax(.) V`` unchanged when every key is an image
    key (any ``score_shift``); masking the duplicate keeps that property for joint text+image
    sequences too. Text queries of a joint sequence do not see the reference keys.

    Attributes:
        score_shift: ``shared_score_shift``, added to the logits of the reference keys (traced;
            the transfer notebook uses ``ln 2``).
        score_scale: ``shared_score_scale``, multiplies the reference keys (traced).
        groups: number of batch chunks, each led by its reference (static; 2 with CFG).
        adain_queries, adain_keys, adain_values: which of q, k, v get AdaIN (static; the
            reference's defaults True, True, False).
    """

    score_shift: Array | float = 0.0
    score_scale: Array | float = 1.0
    groups: int = struct.field(pytree_node=False, default=2)
    adain_queries: bool = struct.field(pytree_node=False, default=True)
    adain_keys: bool = struct.field(pytree_node=False, default=True)
    adain_values: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class AttentionPlan:
    """How one attention call is computed.

    Attributes:
        head_weight: optional SoftPAG weight ``u`` per head, shape ``[H]`` or ``[B, H]``
            (traced: changing values does not recompile). Requires self-attention (T == S).
        impl: name of a registered implementation (static).
        return_probs: also return head-averaged probabilities ``[B, T, S]`` (static).
        perturbed_rows: ``[B]`` bool, the batch rows ``query_blur`` / ``joint_identity`` apply to
            (traced; None: every row). CFG+SEG perturbs only the third chunk of its batch.
        query_blur: SEG's Gaussian blur ``sigma`` of the image queries over ``grid`` (static;
            Hong 2024): kernel ``ceil(6 sigma) + 1`` made odd (at most the grid side, as the
            reference), reflect padding; ``sigma > 9999`` replaces every image query by its
            spatial mean (infinite blur).
        joint_identity: MMDiT PAG (diffusers ``PAGCFGJointAttnProcessor2_0``, static): image
            queries attend only to their own key and to the non-image (text) keys; text queries
            are unchanged. Requires self-attention over the joint sequence (T == S).
        grid: :class:`TokenGrid` of the layer (static), required by ``query_blur`` and
            ``joint_identity``.
        shared_reference: StyleAligned's :class:`SharedReference` (None: off). Requires
            self-attention (T == S); the keys become ``S + grid.size`` (``2 S`` without a grid),
            so ``return_probs`` maps are ``[B, T, S + grid.size]``.
    """

    head_weight: Array | None = None
    impl: str = struct.field(pytree_node=False, default="xla")
    return_probs: bool = struct.field(pytree_node=False, default=False)
    perturbed_rows: Array | None = None
    query_blur: float | None = struct.field(pytree_node=False, default=None)
    joint_identity: bool = struct.field(pytree_node=False, default=False)
    grid: TokenGrid | None = struct.field(pytree_node=False, default=None)
    shared_reference: SharedReference | None = None


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
_NATIVE_JOINT: set[str] = set()  # implementations taking joint_text=(start, length) themselves
# Implementations in optional modules: imported when a plan first names them (they register
# themselves on import).
PLUGINS: dict[str, str] = {"pallas": "jdpt.kernels.attention"}


def register_implementation(name: str, fn: AttentionFn, *, joint_identity: bool = False) -> None:
    """Register an attention implementation under ``name`` (used by ``jdpt.kernels``).

    ``fn(q, k, v, *, head_weight, bias, mask, is_causal, scale, return_probs)`` must return
    ``(out, probs_or_None)`` with the semantics of :func:`xla_attention`. With
    ``joint_identity=True`` it also takes ``joint_text=(start, length)``: a plan's MMDiT identity
    mode then reaches it as ``head_weight`` = 1 on the perturbed rows and the text span (perturbed
    image queries see their own key and the text keys), instead of as a boolean mask.
    """
    _IMPLEMENTATIONS[name] = fn
    if joint_identity:
        _NATIVE_JOINT.add(name)
    else:
        _NATIVE_JOINT.discard(name)


def available_implementations() -> list[str]:
    """The names a plan's ``impl`` may take (registered ones and :data:`PLUGINS`)."""
    return sorted(set(_IMPLEMENTATIONS) | set(PLUGINS))


def implementation(name: str) -> AttentionFn:
    """The implementation registered as ``name``, importing its plugin module on first use."""
    if name not in _IMPLEMENTATIONS and name in PLUGINS:
        importlib.import_module(PLUGINS[name])
    try:
        return _IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {name!r}; available: {available_implementations()}"
        ) from None


register_implementation("xla", xla_attention)
register_implementation("xla_dense", functools.partial(xla_attention, recompute=False))


INFINITE_BLUR = 9999.0  # SEG: sigma above this means infinite blur (every query = the mean)


def blur_matrix(n: int, sigma: float, kernel_size: int) -> np.ndarray:
    """``[n, n]`` matrix of a 1-D Gaussian blur with reflect padding: ``M @ x`` blurs ``x [n]``.

    The kernel is SEG's (Hong 2024): ``kernel_size`` taps at ``linspace(-(k-1)/2, (k-1)/2)``,
    ``exp(-x^2 / (2 sigma^2))`` normalised to sum 1; padding ``k // 2`` with reflection
    (``jnp.pad(mode="reflect")``, the edge sample not repeated).
    """
    half = (kernel_size - 1) / 2
    taps = np.exp(-0.5 * (np.linspace(-half, half, kernel_size) / sigma) ** 2)
    taps = taps / taps.sum()
    pad = kernel_size // 2
    if pad >= n and n > 1:
        raise ValueError(f"blur kernel of {kernel_size} taps is too wide for reflect padding of {n} tokens")
    m = np.zeros((n, n), np.float64)
    for i in range(n):
        for j, tap in enumerate(taps):
            src = i + j - pad
            if n > 1:
                period = 2 * (n - 1)
                src = src % period
                src = period - src if src >= n else src
            else:
                src = 0
            m[i, src] += tap
    return m


def seg_kernel_size(sigma: float, side: int) -> int:
    """SEG's kernel size: ``ceil(6 sigma) + 1`` made odd, at most ``side`` (``side + 1`` when
    ``side`` is even), as the reference's ``gaussian_blur_2d``."""
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    return min(size, side - (side % 2 - 1))


def _blur_queries(q: Array, sigma: float, grid: TokenGrid) -> Array:
    """``q [B, T, H, D]`` with the image queries Gaussian-blurred over ``grid`` (fp32 math)."""
    q = jnp.asarray(q)
    start = grid.start(q.shape[1])
    image = q[:, start:start + grid.size].astype(jnp.float32)
    image = image.reshape(q.shape[0], grid.height, grid.width, *q.shape[2:])
    if sigma > INFINITE_BLUR:
        image = jnp.broadcast_to(image.mean(axis=(1, 2), keepdims=True), image.shape)
    else:
        size = seg_kernel_size(sigma, min(grid.height, grid.width))
        mh = jnp.asarray(blur_matrix(grid.height, sigma, size), jnp.float32)
        mw = jnp.asarray(blur_matrix(grid.width, sigma, size), jnp.float32)
        image = jnp.einsum("ih,jw,bhwnd->bijnd", mh, mw, image, precision=jax.lax.Precision.HIGHEST)
    image = image.reshape(q.shape[0], grid.size, *q.shape[2:]).astype(q.dtype)
    return q.at[:, start:start + grid.size].set(image)


def _joint_identity_mask(length: int, grid: TokenGrid) -> Array:
    """``[T, T]`` bool: image queries see their own key and every non-image key."""
    start = grid.start(length)
    image = np.zeros(length, bool)
    image[start:start + grid.size] = True
    keep = ~(image[:, None] & image[None, :]) | np.eye(length, dtype=bool)
    return jnp.asarray(keep)


def _perturb_inputs(q: Array, k: Array, mask: Array | None, plan: AttentionPlan) -> tuple[Array, Array | None]:
    """Apply the plan's SEG query blur and MMDiT identity mask to the rows ``perturbed_rows``."""
    if plan.grid is None:
        raise ValueError(
            "query_blur / joint_identity need the plan's grid=TokenGrid(height, width, image_first) "
            "(the layer's image token grid); build plans with jdpt.guidance.perturbation"
        )
    b = q.shape[0]
    rows = None
    if plan.perturbed_rows is not None:
        rows = jnp.asarray(plan.perturbed_rows).astype(bool)
        if rows.shape != (b,):
            raise ValueError(f"perturbed_rows must be [B] = [{b}] booleans; got shape {tuple(rows.shape)}")
    if plan.query_blur is not None:
        if not plan.query_blur > 0:
            raise ValueError(f"query_blur (SEG sigma) must be > 0; got {plan.query_blur}")
        blurred = _blur_queries(q, float(plan.query_blur), plan.grid)
        q = blurred if rows is None else jnp.where(rows[:, None, None, None], blurred, q)
    if plan.joint_identity:
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                "joint_identity (MMDiT PAG) needs self-attention over the joint sequence (T == S); got "
                f"T={q.shape[1]}, S={k.shape[1]}"
            )
        keep = _joint_identity_mask(q.shape[1], plan.grid)[None, None]
        if rows is not None:
            keep = jnp.logical_or(keep, ~rows[:, None, None, None])
        mask = keep if mask is None else jnp.logical_and(mask.astype(bool), keep)
    return q, mask


def _share_reference(q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None,
                     plan: AttentionPlan, is_causal: bool) -> tuple[Array, Array, Array, Array, Array]:
    """StyleAligned (:class:`SharedReference`): AdaIN'd ``q, k`` and ``v``, the keys and values
    extended by the group reference's image tokens, and the bias / mask for the extended keys."""
    ref = plan.shared_reference
    b, t, _, _ = q.shape
    s = k.shape[1]
    if plan.head_weight is not None or is_causal or t != s:
        raise ValueError(
            "shared_reference (StyleAligned) applies to plain self-attention (T == S, no head_weight, "
            f"not causal); got T={t}, S={s}, head_weight={plan.head_weight is not None}, is_causal={is_causal}"
        )
    if ref.groups < 1 or b % ref.groups:
        raise ValueError(
            f"shared_reference.groups={ref.groups} must divide the batch {b} (2 with CFG: "
            "[uncond refs+targets, cond refs+targets])"
        )
    n = b // ref.groups
    ref_rows = np.arange(b) // n * n  # each row's reference row
    is_ref = np.arange(b) % n == 0
    start, size = (0, s) if plan.grid is None else (plan.grid.start(s), plan.grid.size)
    image = slice(start, start + size)

    def adain(x: Array) -> Array:
        part = x[:, image].astype(jnp.float32)
        mean = part.mean(axis=1, keepdims=True)
        std = jnp.sqrt(part.var(axis=1, ddof=1, keepdims=True) + ADAIN_EPS)
        styled = (part - mean) / std * std[ref_rows] + mean[ref_rows]
        styled = jnp.where(is_ref[:, None, None, None], part, styled)
        return x.at[:, image].set(styled.astype(x.dtype))

    if ref.adain_queries:
        q = adain(q)
    if ref.adain_keys:
        k = adain(k)
    if ref.adain_values:
        v = adain(v)
    key_scale = jnp.where(is_ref, 1.0, jnp.asarray(ref.score_scale, jnp.float32))[:, None, None, None]
    k = jnp.concatenate([k, (k[ref_rows, image] * key_scale).astype(k.dtype)], axis=1)
    v = jnp.concatenate([v, v[ref_rows, image]], axis=1)

    # Extra keys: seen by the image queries of non-reference rows only.
    see_extra = (~is_ref)[:, None, None, None]
    if plan.grid is not None:
        image_query = np.zeros(t, bool)
        image_query[image] = True
        see_extra = see_extra & image_query[None, None, :, None]
    lead = see_extra.shape[:3]
    mask, bias = (None if x is None else jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape) for x in (mask, bias))
    if mask is not None:
        lead = jnp.broadcast_shapes(mask.shape[:3], lead)
        own = jnp.broadcast_to(mask.astype(bool), (*lead, s))
    else:
        own = jnp.ones((*lead, s), bool)
    mask = jnp.concatenate([own, jnp.broadcast_to(jnp.asarray(see_extra), (*lead, size))], axis=-1)

    shift = jnp.asarray(ref.score_shift, jnp.float32)
    extra_bias = jnp.concatenate([jnp.zeros((s,), jnp.float32), jnp.broadcast_to(shift, (size,))])
    if bias is None:
        bias = extra_bias[None, None, None]
    else:
        bias = jnp.broadcast_to(bias.astype(jnp.float32), (*bias.shape[:3], s))
        bias = jnp.concatenate([bias, jnp.zeros((*bias.shape[:3], size), jnp.float32)], axis=-1) + extra_bias
    return q, k, v, bias, mask


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
    fn = implementation(plan.impl)
    native_joint = plan.joint_identity and plan.impl in _NATIVE_JOINT
    if plan.query_blur is not None or (plan.joint_identity and not native_joint):
        q, mask = _perturb_inputs(q, k, mask, plan.replace(joint_identity=False) if native_joint else plan)
    if plan.shared_reference is not None:
        q, k, v, bias, mask = _share_reference(q, k, v, bias, mask, plan, is_causal)
    head_weight, extra = plan.head_weight, {}
    if native_joint:
        head_weight, extra["joint_text"] = _joint_rows(q, k, plan)
    return fn(
        q,
        k,
        v,
        head_weight=head_weight,
        bias=bias,
        mask=mask,
        is_causal=is_causal,
        scale=scale,
        return_probs=plan.return_probs,
        **extra,
    )


def _joint_rows(q: Array, k: Array, plan: AttentionPlan) -> tuple[Array, tuple[int, int]]:
    """The MMDiT identity mode as an implementation's ``head_weight`` ``[B, H]`` (1 on the
    perturbed rows) and ``joint_text=(start, length)`` (the non-image tokens)."""
    b, t, h, _ = q.shape
    if plan.head_weight is not None:
        raise NotImplementedError(
            f"joint_identity together with head_weight is not supported by impl={plan.impl!r}; "
            "use AttentionPlan(impl='xla') for this layer"
        )
    if k.shape[1] != t:
        raise ValueError(f"joint_identity (MMDiT PAG) needs self-attention over the joint sequence (T == S); "
                         f"got T={t}, S={k.shape[1]}")
    if plan.grid is None:
        raise ValueError("joint_identity needs the plan's grid=TokenGrid(height, width, image_first)")
    start, size = plan.grid.start(t), plan.grid.size
    text = (start + size, t - start - size) if plan.grid.image_first else (0, start)
    rows = jnp.ones((b,), bool) if plan.perturbed_rows is None else jnp.asarray(plan.perturbed_rows).astype(bool)
    if rows.shape != (b,):
        raise ValueError(f"perturbed_rows must be [B] = [{b}] booleans; got shape {tuple(rows.shape)}")
    return jnp.broadcast_to(rows[:, None], (b, h)).astype(jnp.float32), text


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
