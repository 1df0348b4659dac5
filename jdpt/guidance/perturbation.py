"""Attention-perturbation guidance: PAG, SoftPAG and SEG, each an attention plan for the
``"perturbed"`` chunk of a batched forward plus a combination rule.

- PAG (Ahn et al., ECCV 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
  Guidance"): in the chosen self-attention layers the perturbed branch replaces the attention map
  by the identity, so the layer outputs ``to_out(to_v(x))``. In joint (MMDiT) layers the
  perturbed branch follows diffusers' ``PAGCFGJointAttnProcessor2_0``: image queries attend only
  to their own key and to the text keys; text queries are unchanged.
- SoftPAG (HeadHunter, arXiv 2506.10978): per-(layer, head) weight ``u``,
  ``out = (1 - u) softmax(q k^T / sqrt(d)) v + u v``; ``u = 1`` on every head is PAG. In layers
  whose sequence holds text tokens too, ``u`` perturbs the whole joint sequence (the attention
  entry point's ``head_weight`` semantics: each token keeps ``u`` of its own value).
- SEG (Hong, NeurIPS 2024, "Smoothed Energy Guidance"): the perturbed branch Gaussian-blurs the
  image queries over their token grid (``AttentionPlan.query_blur``).

All combine as ``e_u + w (e_c - e_u) + s (e_c - e_p)`` over the batch ``[uncond, cond,
perturbed]`` (diffusers ``pag_utils``), or ``e_c + s (e_c - e_p)`` without CFG, so with CFG the
three branches are one forward whose plan perturbs only the third chunk.

Layers are chosen by a regular expression over the model's stable layer names
(``attention_layer_names``); the defaults are diffusers': ``"mid"`` for UNets (every
self-attention of the mid block) and ``"blocks.1"`` for DiTs (the joint attention of transformer
block 1). diffusers' own matching of ``pag_applied_layers`` is an unanchored regex search that
picks more layers on deep models (``"blocks.1"`` also selects blocks 10-19 of SD3);
:func:`diffusers_pag_layers` reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jdpt.diffusion.branches import split_branches
from jdpt.guidance.cfg import kernel_combine
from jdpt.models.attention import AttentionPlan, LayerPlans, TokenGrid, attention_layer_names
from jdpt.models.flux import FluxAttention, FluxTransformer
from jdpt.models.sd3 import SD3Attention, SD3Transformer
from jdpt.models.unet import UNet2DConditionModel

Array = jax.Array

UNET_DEFAULT_LAYERS = r"mid\.attn\.\d+\.self"
DIT_DEFAULT_LAYERS = r"transformer_blocks\.1\.attn"


def pag(e_c: Array, e_p: Array, s: float | Array, *, e_u: Array | None = None, w: float | Array = 1.0) -> Array:
    """Perturbation guidance combination (PAG and SEG alike; diffusers ``pag_utils``).

    With ``e_u``: ``e_u + w (e_c - e_u) + s (e_c - e_p)``; without: ``e_c + s (e_c - e_p)``.
    ``s = 0`` is plain CFG (or ``e_c``). The ADM reference form ``e_p + s' (e - e_p)`` with
    ``s' = 4`` equals ``s = 3`` here.

    e_c, e_p, e_u: ``[B, ...]``. Returns ``[B, ...]`` fp32.
    """
    e_c, e_p = jnp.asarray(e_c, jnp.float32), jnp.asarray(e_p, jnp.float32)
    if e_c.shape != e_p.shape or (e_u is not None and e_u.shape != e_c.shape):
        raise ValueError(
            f"guidance predictions must have the same shape; got e_c {e_c.shape}, e_p {e_p.shape}"
            + ("" if e_u is None else f", e_u {e_u.shape}")
        )
    guided = e_c if e_u is None else (e_u := jnp.asarray(e_u, jnp.float32)) + w * (e_c - e_u)
    return guided + s * (e_c - e_p)


seg = pag  # SEG combines its blurred-query branch exactly as PAG does (Hong 2024, eq. 9).


def adaptive_scale(s: float | Array, s_ad: float | Array, timestep: Array) -> Array:
    """PAG's adaptive scale ``max(0, s - s_ad (1000 - t))`` (diffusers ``_get_pag_scale``);
    ``s_ad = 0`` gives ``s``. ``timestep`` in ``[0, 1000]``."""
    return jnp.maximum(0.0, s - s_ad * (1000.0 - jnp.asarray(timestep, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """An attention layer as a plan sees it: heads, image token grid, whether text tokens share
    its sequence (joint MMDiT attention and Flux single-stream blocks)."""

    heads: int
    grid: TokenGrid
    joint: bool


def attention_layers(model: nnx.Module, latent_size: tuple[int, int]) -> dict[str, LayerInfo]:
    """Every attention layer of a UNet, SD3 or Flux model with its token grid for latents of
    spatial size ``latent_size`` (the denoiser's input: NHWC ``[H, W]`` for UNet/SD3, the
    unpacked latent ``[H, W]`` for Flux, whose tokens are 2x2 patches).

    UNet layers of down block ``i`` see ``H / 2^i``, the mid block and up block 0 the coarsest
    grid, up block ``i`` ``H / 2^(n-1-i)``; cross-attention layers are included (``joint=False``)
    but have no self-attention to perturb.
    """
    h, w = latent_size
    if isinstance(model, UNet2DConditionModel):
        levels = len(model.config.block_out_channels) - 1
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"latent size {h}x{w} must be divisible by the UNet's downsampling {2**levels}")

        def grid(name: str) -> TokenGrid:
            block, index = name.split(".")[:2]
            if block == "mid":
                level = levels
            else:
                level = int(index) if block == "down" else levels - int(index)
            return TokenGrid(h // 2**level, w // 2**level)
    elif isinstance(model, SD3Transformer):
        p = model.config.patch_size

        def grid(name: str) -> TokenGrid:
            return TokenGrid(h // p, w // p, image_first=True)
    elif isinstance(model, FluxTransformer):
        def grid(name: str) -> TokenGrid:
            return TokenGrid(h // 2, w // 2, image_first=False)
    else:
        raise ValueError(
            f"perturbation guidance supports UNet2DConditionModel, SD3Transformer and FluxTransformer; "
            f"got {type(model).__name__}"
        )
    layers = {}
    for _, node in nnx.iter_graph(model):
        name = getattr(node, "layer_name", None)
        if isinstance(node, nnx.Module) and isinstance(name, str):
            joint = isinstance(node, FluxAttention) or (isinstance(node, SD3Attention) and node.joint)
            layers[name] = LayerInfo(node.heads, grid(name), joint)
    return layers


def default_layers(model: nnx.Module) -> str:
    """diffusers' default PAG/SEG layers as a pattern over jdpt layer names: ``"mid"`` for a
    UNet, ``"blocks.1"`` for a DiT."""
    return UNET_DEFAULT_LAYERS if isinstance(model, UNet2DConditionModel) else DIT_DEFAULT_LAYERS


def diffusers_pag_layers(model: nnx.Module, pag_applied_layers: str | Sequence[str]) -> str:
    """The layers diffusers' SD3 PAG pipelines perturb for ``pag_applied_layers``, as a ``layers``
    pattern for :class:`PAG` / :class:`SEG` (an alternation of exact jdpt layer names).

    diffusers (``PAGMixin._set_pag_attn_processor``) takes every self-attention module whose
    module path contains an *unanchored* ``re.search`` match of a layer id (its "fake integral
    match" check only looks at paths ending in a number, and SD3's end in ``attn``/``attn2``).
    So its default ``"blocks.1"`` selects
    ``transformer_blocks.1.attn`` and also blocks 10-19 on a model with that many blocks (every
    SD3 / SD3.5 checkpoint), while :func:`default_layers` is block 1 only. On SD3.5 dual-attention
    blocks it selects ``attn2`` too, where diffusers' joint PAG processor fails (no text tokens);
    jdpt perturbs that image-only layer with identity attention.

    Only SD3 models: their layer names are the diffusers module paths (UNet names are not).
    Raises when an id selects nothing, as diffusers does.
    """
    if not isinstance(model, SD3Transformer):
        raise ValueError(
            f"diffusers_pag_layers maps diffusers module paths, which are jdpt's layer names only for "
            f"SD3Transformer; got {type(model).__name__}. Give PAG(layers=...) a pattern over "
            "attention_layer_names(model) instead"
        )
    ids = [pag_applied_layers] if isinstance(pag_applied_layers, str) else list(pag_applied_layers)
    if not ids:
        raise ValueError("pag_applied_layers must name at least one layer id (diffusers' default: 'blocks.1')")
    names = attention_layer_names(model)
    chosen = []
    for layer_id in ids:
        hits = [n for n in names if re.search(layer_id, n)]
        if not hits:
            raise ValueError(f"PAG layer id {layer_id!r} matches no self-attention layer; the model's layers are: "
                             f"{names}")
        chosen += [n for n in hits if n not in chosen]
    return "|".join(re.escape(n) for n in chosen)


def select_layers(layers: Mapping[str, LayerInfo], pattern: str) -> list[str]:
    """Self-attention layers (never ``.cross``) whose name fully matches ``pattern``; raises
    when none does, so a typo cannot silently turn guidance off."""
    chosen = [n for n in layers if re.fullmatch(pattern, n) and not n.endswith(".cross")]
    if not chosen:
        raise ValueError(
            f"layer pattern {pattern!r} matches no self-attention layer; the model's layers are: {list(layers)}"
        )
    return chosen


def perturbed_rows(branches: tuple[str, ...], batch: int) -> np.ndarray:
    """``[len(branches) * batch]`` bool: True on the rows of the ``"perturbed"`` chunk."""
    if "perturbed" not in branches:
        raise ValueError(f"perturbation guidance needs a 'perturbed' branch; got branches {branches}")
    return np.repeat(np.asarray([b == "perturbed" for b in branches]), batch)


def pag_plans(model: nnx.Module, rows: np.ndarray, latent_size: tuple[int, int], *, layers: str | None = None,
              head_weights: Mapping[str, Array] | None = None, impl: str = "xla") -> LayerPlans:
    """Plans perturbing the rows ``rows`` (``[N]`` bool) with PAG or SoftPAG.

    Without ``head_weights``: PAG on the layers matching ``layers`` (default
    :func:`default_layers`): identity attention (``head_weight = 1``) on image-only layers, the
    joint identity mask on joint layers. With ``head_weights`` ``{layer name: u [H]}``: SoftPAG
    on exactly those layers, ``head_weight = u`` on the perturbed rows and 0 elsewhere.
    """
    info = attention_layers(model, latent_size)
    mask = jnp.asarray(rows, jnp.float32)[:, None]
    plans = {}
    if head_weights is not None:
        for name, u in head_weights.items():
            if name not in info:
                raise ValueError(f"head_weights names unknown layer {name!r}; the model's layers are: {list(info)}")
            u = jnp.asarray(u, jnp.float32)
            if u.shape != (info[name].heads,):
                raise ValueError(f"head_weights[{name!r}] must be [H] = [{info[name].heads}]; got {tuple(u.shape)}")
            plans[name] = AttentionPlan(head_weight=mask * u[None], impl=impl)
    else:
        for name in select_layers(info, layers or default_layers(model)):
            if info[name].joint:
                plans[name] = AttentionPlan(perturbed_rows=jnp.asarray(rows), joint_identity=True,
                                            grid=info[name].grid, impl=impl)
            else:
                plans[name] = AttentionPlan(head_weight=jnp.broadcast_to(mask, (len(rows), info[name].heads)),
                                            impl=impl)
    return LayerPlans(default=AttentionPlan(impl=impl), layers=plans)


def seg_plans(model: nnx.Module, rows: np.ndarray, latent_size: tuple[int, int], sigma: float, *,
              layers: str | None = None, impl: str = "xla") -> LayerPlans:
    """Plans blurring the image queries of the rows ``rows`` (``[N]`` bool) with SEG's
    Gaussian of width ``sigma`` in the layers matching ``layers`` (default :func:`default_layers`)."""
    info = attention_layers(model, latent_size)
    chosen = select_layers(info, layers or default_layers(model))
    plans = {name: AttentionPlan(perturbed_rows=jnp.asarray(rows), query_blur=float(sigma), grid=info[name].grid,
                                 impl=impl) for name in chosen}
    return LayerPlans(default=AttentionPlan(impl=impl), layers=plans)


def _combine(predictions: Array, branches: tuple[str, ...], s: Array, w, impl: str = "xla") -> Array:
    if impl != "xla":
        return kernel_combine(predictions, branches, "pag", impl, s=s, w=w if "uncond" in branches else None)
    p = split_branches(predictions, branches)
    return pag(p["cond"], p["perturbed"], s, e_u=p.get("uncond"), w=w)


class _PerturbationGuidance:
    """What PAG, SoftPAG and SEG share: the ``[uncond,] cond, perturbed`` batch (``use_cfg``) and
    PAG's combination at a constant ``scale`` (PAG overrides it for its adaptive scale)."""

    @property
    def branches(self) -> tuple[str, ...]:
        return ("uncond", "cond", "perturbed") if self.use_cfg else ("cond", "perturbed")

    def combine(self, predictions: Array, *, step: Array, timestep: Array) -> Array:
        return _combine(predictions, self.branches, jnp.float32(self.scale), self.cfg_scale, self.combine_impl)


@struct.dataclass
class PAG(_PerturbationGuidance):
    """Perturbed-Attention Guidance (Ahn et al., ECCV 2024), diffusers' PAG pipelines.

    Attributes:
        scale: ``s`` (``pag_scale``, default 3.0); traced.
        cfg_scale: CFG ``w`` when ``use_cfg`` (SD default 7.5; SDXL 5.0); traced.
        adaptive_scale: ``s_ad`` (``pag_adaptive_scale``; 0: constant ``s``); traced.
        layers: regex over layer names (None: ``"mid"`` for UNets, ``"blocks.1"`` for DiTs).
        use_cfg: batch ``[uncond, cond, perturbed]`` (True) or ``[cond, perturbed]``.
        impl: attention implementation for the whole forward.
        combine_impl: ``"xla"`` (default) or ``"pallas"``: the combination through
            :func:`jdpt.guidance.cfg.kernel_combine` (opt-in, see ``jdpt.kernels.guidance``).
    """

    scale: float | Array = 3.0
    cfg_scale: float | Array = 7.5
    adaptive_scale: float | Array = 0.0
    layers: str | None = struct.field(pytree_node=False, default=None)
    use_cfg: bool = struct.field(pytree_node=False, default=True)
    impl: str = struct.field(pytree_node=False, default="xla")
    combine_impl: str = struct.field(pytree_node=False, default="xla")

    def plans(self, model: nnx.Module, batch: int, latent_size: tuple[int, int]) -> LayerPlans:
        return pag_plans(model, perturbed_rows(self.branches, batch), latent_size, layers=self.layers,
                         impl=self.impl)

    def combine(self, predictions: Array, *, step: Array, timestep: Array) -> Array:
        s = adaptive_scale(self.scale, self.adaptive_scale, timestep)
        return _combine(predictions, self.branches, s, self.cfg_scale, self.combine_impl)


@struct.dataclass
class SoftPAG(_PerturbationGuidance):
    """SoftPAG with per-(layer, head) weights ``u`` (HeadHunter, arXiv 2506.10978), combined as
    PAG. ``head_weights``: ``{layer name: u [H]}`` (traced), e.g. from
    :func:`jdpt.guidance.head_search.head_hunter`."""

    head_weights: Mapping[str, Array]
    scale: float | Array = 3.0
    cfg_scale: float | Array = 7.5
    use_cfg: bool = struct.field(pytree_node=False, default=True)
    impl: str = struct.field(pytree_node=False, default="xla")
    combine_impl: str = struct.field(pytree_node=False, default="xla")

    def plans(self, model: nnx.Module, batch: int, latent_size: tuple[int, int]) -> LayerPlans:
        return pag_plans(model, perturbed_rows(self.branches, batch), latent_size,
                         head_weights=self.head_weights, impl=self.impl)


@struct.dataclass
class SEG(_PerturbationGuidance):
    """Smoothed Energy Guidance (Hong, NeurIPS 2024; SusungHong/SEG-SDXL), SDXL defaults.

    Attributes:
        scale: ``seg_scale`` (3.0); traced.
        sigma: blur width over the token grid (static; ``> 9999``: infinite blur, the default
            9999999).
        cfg_scale: CFG ``w`` when ``use_cfg``; traced.
        layers: regex over layer names (None: ``"mid"`` / ``"blocks.1"``).
        combine_impl: ``"xla"`` (default) or ``"pallas"``, as for :class:`PAG`.
    """

    scale: float | Array = 3.0
    cfg_scale: float | Array = 5.0
    sigma: float = struct.field(pytree_node=False, default=9999999.0)
    layers: str | None = struct.field(pytree_node=False, default=None)
    use_cfg: bool = struct.field(pytree_node=False, default=True)
    impl: str = struct.field(pytree_node=False, default="xla")
    combine_impl: str = struct.field(pytree_node=False, default="xla")

    def plans(self, model: nnx.Module, batch: int, latent_size: tuple[int, int]) -> LayerPlans:
        return seg_plans(model, perturbed_rows(self.branches, batch), latent_size, self.sigma, layers=self.layers,
                         impl=self.impl)
