"""The latent-diffusion UNet of Stable Diffusion 1.x/2.x and SDXL: diffusers ``UNet2DConditionModel``.

Same inputs in the same conventions give the same output as the diffusers module, with images in
NHWC: ``sample [B, H, W, in_channels]``, ``timestep`` ``[B]`` (or a scalar), text tokens
``encoder_hidden_states [B, L, cross_attention_dim]`` and, for SDXL (``addition_embed_type=
"text_time"``), ``added_cond_kwargs={"text_embeds": [B, E], "time_ids": [B, 6]}``. ControlNet
residuals enter through ``down_block_additional_residuals`` / ``mid_block_additional_residual``
(see :mod:`jdpt.models.controlnet`). Attribute names follow the diffusers module tree
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``, ...), so weights map onto
diffusers state dicts by name.

Supported: ``CrossAttnDownBlock2D``/``DownBlock2D`` down blocks, ``UNetMidBlock2DCrossAttn``,
``CrossAttnUpBlock2D``/``UpBlock2D`` up blocks, conv or linear ``proj_in``/``proj_out``, per-block
head counts and transformer depths, the SDXL ``text_time`` added embedding. Other diffusers options
(class embeddings, encoder projections, time-conditioning projections, ...) raise in
``validate()``; attention masks, T2I-Adapter residuals and FreeU are not implemented.

Attention layer names (the ``layer_name`` of every attention module; plans address them):

- ``down.{i}.attn.{j}.self`` / ``down.{i}.attn.{j}.cross``: down block ``i``;
- ``mid.attn.{j}.self`` / ``mid.attn.{j}.cross``: the mid block;
- ``up.{i}.attn.{j}.self`` / ``up.{i}.attn.{j}.cross``: up block ``i`` (``up_blocks[i]``, lowest
  resolution first).

``j`` numbers the transformer blocks of block ``i`` in execution order: ``j = a * T + t`` for
``attentions[a].transformer_blocks[t]``, where ``T`` is the block's transformer depth. E.g. a
down block with 2 attentions of ``transformer_layers_per_block=2`` has ``j = 0, 1`` in
``attentions.0`` and ``j = 2, 3`` in ``attentions.1``. ``.self`` is ``attn1`` (self-attention over
the ``h * w`` positions), ``.cross`` is ``attn2`` (queries from the image, keys/values from the
text). diffusers' ``pag_applied_layers=["mid"]`` is ``plan_layers(attention_layer_names(unet),
r"mid\\..*\\.self", ...)``.

Activations follow the input's dtype (bf16 inputs and weights run in bf16); timestep sinusoids,
group/layer-norm statistics and attention logits are computed in fp32.

Reference: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", 2022;
Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", 2023.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.attention import AttentionPlan, LayerPlans
from jdpt.models.config import ModelConfig
from jdpt.models.embeddings import MLPEmbedding, timestep_embedding
from jdpt.models.layers import activation, conv2d, group_norm
from jdpt.models.unet_blocks import DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D

Array = jax.Array
Plans = LayerPlans | AttentionPlan | None
Shape = tuple[int, ...]

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_TEXT_TIME_KEYS = ("text_embeds", "time_ids")


@dataclasses.dataclass(frozen=True)
class UNetEncoderConfig(ModelConfig):
    """The config keys shared by diffusers ``UNet2DConditionModel`` and ``ControlNetModel`` (the
    input half: ``conv_in``, time embedding, down blocks, mid block). Defaults are diffusers'.

    ``attention_head_dim`` is, as in diffusers, the number of attention *heads* per block when
    ``num_attention_heads`` is None (a naming slip diffusers keeps for compatibility); each head
    then has ``block_out_channels[i] // heads`` channels.
    """

    # key -> the only value jdpt implements (every released SD 1.x/2.x/SDXL checkpoint uses it)
    fixed_keys: ClassVar[dict[str, Any]] = {
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "downsample_padding": 1,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "class_embed_type": None,
        "num_class_embeds": None,
        "resnet_time_scale_shift": "default",
    }
    # no effect with the supported blocks and attention (logits are always fp32)
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"upcast_attention", "addition_embed_type_num_heads"})

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels is empty; give one channel count per block, e.g. (320, 640, 1280)")
        for key, value in self.fixed_keys.items():
            if getattr(self, key) != value:
                raise ValueError(
                    f"{key}={getattr(self, key)!r} is not supported by jdpt's {self.reference_class}; "
                    f"only {key}={value!r} (the value of the SD 1.x/2.x/SDXL checkpoints) is implemented"
                )
        if any(_per_block(self.only_cross_attention, n)):
            raise ValueError(
                f"only_cross_attention={self.only_cross_attention!r} is not supported: jdpt's transformer "
                "blocks always have self-attention (attn1) and cross-attention (attn2); use False"
            )
        if len(self.down_block_types) != n or any(t not in _DOWN_BLOCKS for t in self.down_block_types):
            raise ValueError(
                f"down_block_types {self.down_block_types} must give one of {_DOWN_BLOCKS} for each of "
                f"the {n} block_out_channels {self.block_out_channels}"
            )
        for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "layers_per_block"):
            value = getattr(self, key)
            if value is None and key == "num_attention_heads":
                continue
            values = _per_block(value, n)
            if len(values) != n or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(
                    f"{key}={value!r} must be a positive int or a tuple of {n} positive ints (one per "
                    f"entry of block_out_channels {self.block_out_channels})"
                )
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(
                f"cross_attention_dim={self.cross_attention_dim!r}: jdpt takes one text width for every "
                "block; give a single int"
            )
        groups = self.norm_num_groups
        bad = [c for c in self.block_out_channels if not isinstance(groups, int) or groups < 1 or c % groups]
        if bad:
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups="
                f"{groups} (bad: {bad}); change either"
            )
        bad = [(c, h) for c, h in zip(self.block_out_channels, self.heads) if c % h]
        if bad:
            raise ValueError(
                f"block channels must divide into the attention heads (channels, heads): {bad}; heads "
                f"come from num_attention_heads={self.num_attention_heads} or, when that is None, from "
                f"attention_head_dim={self.attention_head_dim} (diffusers' naming)"
            )
        activation(self.act_fn, field="act_fn")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"addition_embed_type={self.addition_embed_type!r} is not supported; use None (SD 1.x/2.x) "
                "or 'text_time' (SDXL)"
            )
        if self.addition_embed_type == "text_time" and not (
            isinstance(self.addition_time_embed_dim, int) and isinstance(self.projection_class_embeddings_input_dim, int)
        ):
            raise ValueError(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim (SDXL: 256 and 2816); got "
                f"{self.addition_time_embed_dim} and {self.projection_class_embeddings_input_dim}"
            )

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block (diffusers: ``num_attention_heads or attention_head_dim``)."""
        heads = self.num_attention_heads or self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels))

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        """Transformer blocks in each attention of each block."""
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels))

    @property
    def layers(self) -> tuple[int, ...]:
        """Resnets per down block (up blocks have one more)."""
        return _per_block(self.layers_per_block, len(self.block_out_channels))

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Sample pixels per lowest-resolution pixel: the sample's H and W must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(UNetEncoderConfig):
    """diffusers ``UNet2DConditionModel`` config (defaults: diffusers', i.e. SD 1.x).

    SDXL: ``use_linear_projection=True``, ``addition_embed_type="text_time"``,
    ``attention_head_dim=(5, 10, 20)``, ``transformer_layers_per_block=(1, 2, 10)``.
    diffusers rejects ``num_attention_heads`` for this class; so does jdpt.
    """

    reference_class: ClassVar[str] = "UNet2DConditionModel"
    fixed_keys: ClassVar[dict[str, Any]] = {
        **UNetEncoderConfig.fixed_keys,
        "dropout": 0.0,
        "reverse_transformer_layers_per_block": None,
        "dual_cross_attention": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
        "class_embeddings_concat": False,
    }
    ignored_keys: ClassVar[frozenset[str]] = UNetEncoderConfig.ignored_keys | {
        "resnet_skip_time_act", "resnet_out_scale_factor", "mid_block_only_cross_attention",
        "cross_attention_norm",  # used only by block types jdpt does not implement
    }

    sample_size: int | tuple[int, ...] | None = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    dropout: float = 0.0
    reverse_transformer_layers_per_block: tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"
    class_embeddings_concat: bool = False

    def validate(self) -> None:
        if self.num_attention_heads is not None:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads!r}: diffusers' UNet2DConditionModel rejects "
                "it; its head count is attention_head_dim (a naming slip diffusers keeps), so give the "
                f"heads as attention_head_dim={self.num_attention_heads!r} and num_attention_heads=None"
            )
        super().validate()
        n = len(self.block_out_channels)
        if len(self.up_block_types) != n or any(t not in _UP_BLOCKS for t in self.up_block_types):
            raise ValueError(
                f"up_block_types {self.up_block_types} must give one of {_UP_BLOCKS} for each of the "
                f"{n} block_out_channels {self.block_out_channels}"
            )


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, tuple) else (value,) * n


class UNetEncoder(nnx.Module):
    """The input half shared by :class:`UNet2DConditionModel` and ``ControlNetModel``: ``conv_in``,
    the time (and SDXL added) embedding, the down blocks and the mid block, with input checks."""

    config: UNetEncoderConfig

    def _init_encoder(self, config: UNetEncoderConfig, kw: dict) -> None:
        c0, dim = config.block_out_channels[0], config.time_embed_dim
        self.conv_in = conv2d(config.in_channels, c0, 3, padding=1, **kw)
        self.time_embedding = MLPEmbedding(c0, dim, act=activation(config.act_fn), **kw)
        self.add_embedding = (
            MLPEmbedding(config.projection_class_embeddings_input_dim, dim, **kw)
            if config.addition_embed_type == "text_time" else None
        )
        self.down_blocks = nnx.List([DownBlock2D(config, i, **kw) for i in range(len(config.block_out_channels))])
        self.mid_block = UNetMidBlock2DCrossAttn(config, **kw)

    def residual_shapes(self, batch: int, height: int, width: int) -> tuple[list[Shape], Shape]:
        """Shapes of the down-block skip states (ControlNet's ``down_block_res_samples``) and of the
        mid-block output for a ``[batch, height, width, in_channels]`` sample."""
        cfg = self.config
        shapes = [(batch, height, width, cfg.block_out_channels[0])]
        for i, c in enumerate(cfg.block_out_channels):
            shapes += [(batch, height, width, c)] * cfg.layers[i]
            if i < len(cfg.block_out_channels) - 1:
                height, width = height // 2, width // 2
                shapes.append((batch, height, width, c))
        return shapes, (batch, height, width, cfg.block_out_channels[-1])

    def _embed(self, sample: Array, timestep: Array, added_cond_kwargs: Mapping[str, Array] | None) -> Array:
        """The time embedding ``[B, time_embed_dim]`` (plus SDXL's text/size embedding)."""
        cfg = self.config
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        proj = dict(flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], **proj).astype(sample.dtype)
        emb = self.time_embedding(t_emb)
        if cfg.addition_embed_type == "text_time":
            text, ids = added_cond_kwargs["text_embeds"], jnp.asarray(added_cond_kwargs["time_ids"])
            ids_emb = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, **proj).reshape(b, -1)
            emb = emb + self.add_embedding(jnp.concatenate([text, ids_emb], axis=-1).astype(emb.dtype))
        return emb

    def _down(self, x: Array, emb: Array, context: Array, plans: Plans) -> tuple[Array, list[Array]]:
        """The down blocks on ``x = conv_in(sample) [B, H, W, C0]`` (plus, in a ControlNet, the
        embedded condition). Returns the last block's output and every skip state (``x`` first)."""
        states = [x]
        for block in self.down_blocks:
            x, block_states = block(x, emb, context, plans)
            states += block_states
        return x, states

    def _check_inputs(self, sample: Array, timestep: Array, context: Array,
                      added_cond_kwargs: Mapping[str, Array] | None) -> None:
        cfg = self.config
        shape = tuple(sample.shape)
        c = cfg.in_channels
        if len(shape) != 4 or shape[-1] != c:
            hint = (" It looks NCHW: transpose it with sample.transpose(0, 2, 3, 1)."
                    if len(shape) == 4 and shape[1] == c else "")
            raise ValueError(f"sample must be NHWC [B, H, W, in_channels={c}]; got shape {shape}.{hint}")
        b, f = shape[0], cfg.downsample_factor
        if shape[1] % f or shape[2] % f:
            up_h, up_w = (-(-s // f) * f for s in shape[1:3])
            raise ValueError(
                f"sample spatial size {shape[1]}x{shape[2]} is not divisible by the UNet's downsampling "
                f"factor {f} (2 ** (len(block_out_channels) - 1)); pad it (e.g. to {up_h}x{up_w}) or crop "
                f"it to multiples of {f}"
            )
        if jnp.shape(timestep) not in ((), (1,), (b,)):
            raise ValueError(f"timestep must be a scalar or [B={b}]; got shape {jnp.shape(timestep)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be [B={b}, L, cross_attention_dim={cfg.cross_attention_dim}]; "
                f"got {tuple(context.shape)}"
            )
        if cfg.addition_embed_type != "text_time":
            if added_cond_kwargs:
                raise ValueError(
                    f"added_cond_kwargs {sorted(added_cond_kwargs)} given to a model without an added "
                    "embedding (addition_embed_type=None, SD 1.x/2.x); pass added_cond_kwargs=None"
                )
            return
        kwargs = dict(added_cond_kwargs or {})
        if sorted(kwargs) != sorted(_TEXT_TIME_KEYS):
            raise ValueError(
                "this SDXL-style model (addition_embed_type='text_time') needs added_cond_kwargs="
                "{'text_embeds': [B, E], 'time_ids': [B, 6]}; got keys "
                f"{sorted(kwargs) if added_cond_kwargs is not None else None}"
            )
        text, ids = jnp.shape(kwargs["text_embeds"]), jnp.shape(kwargs["time_ids"])
        if len(text) != 2 or len(ids) != 2 or text[0] != b or ids[0] != b:
            raise ValueError(f"text_embeds and time_ids must be [B={b}, E] and [B={b}, N]; got {text} and {ids}")
        width = text[1] + ids[1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {text} and time_ids {ids} embed to width {text[1]} + {ids[1]} * "
                f"addition_time_embed_dim={cfg.addition_time_embed_dim} = {width}, but add_embedding takes "
                f"projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}; pass "
                f"{cfg.projection_class_embeddings_input_dim - ids[1] * cfg.addition_time_embed_dim}-wide "
                "text_embeds (the pooled text of the second text encoder)"
            )


class UNet2DConditionModel(UNetEncoder):
    """diffusers ``UNet2DConditionModel`` in Flax NNX (NHWC): predicts the noise (or v) of a latent."""

    config_class = UNet2DConditionConfig

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self._init_encoder(config, kw)
        self.up_blocks = nnx.List([UpBlock2D(config, i, **kw) for i in range(len(config.block_out_channels))])
        c0 = config.block_out_channels[0]
        self.conv_norm_out = group_norm(c0, config.norm_num_groups, eps=config.norm_eps, **kw)
        self.conv_act = activation(config.act_fn)
        self.conv_out = conv2d(c0, config.out_channels, 3, padding=1, **kw)

    def __call__(
        self,
        sample: Array,
        timestep: Array | float,
        encoder_hidden_states: Array,
        *,
        added_cond_kwargs: Mapping[str, Array] | None = None,
        down_block_additional_residuals: Sequence[Array] | None = None,
        mid_block_additional_residual: Array | None = None,
        plans: Plans = None,
    ) -> Array:
        """Denoiser output for a noisy latent.

        Args:
            sample: ``[B, H, W, in_channels]``; H and W multiples of ``config.downsample_factor``.
            timestep: ``[B]`` or a scalar (diffusion steps, e.g. 0..999).
            encoder_hidden_states: ``[B, L, cross_attention_dim]`` text tokens.
            added_cond_kwargs: SDXL only: ``{"text_embeds": [B, E], "time_ids": [B, 6]}``.
            down_block_additional_residuals: ControlNet residuals, one per skip state, shaped as
                :meth:`residual_shapes` says (or ``[B, 1, 1, C]``, globally pooled); given together
                with ``mid_block_additional_residual`` (the mid-block output's shape).
            plans: attention plans by layer name (see the module docstring).

        Returns:
            ``[B, H, W, out_channels]``.
        """
        self._check_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        self._check_residuals(sample.shape, down_block_additional_residuals, mid_block_additional_residual)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embed(sample, timestep, added_cond_kwargs)
        x, skips = self._down(self.conv_in(sample), emb, encoder_hidden_states, plans)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        x = self.mid_block(x, emb, encoder_hidden_states, plans)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            x = block(x, skips[-n:], emb, encoder_hidden_states, plans)
            skips = skips[:-n]
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))

    def _check_residuals(self, shape: Shape, down: Sequence[Array] | None, mid: Array | None) -> None:
        if down is None and mid is None:
            return
        if down is None or mid is None:
            raise ValueError(
                "ControlNet residuals come in pairs: pass both down_block_additional_residuals and "
                "mid_block_additional_residual (got only the "
                f"{'down' if mid is None else 'mid'} one)"
            )
        want, want_mid = self.residual_shapes(*shape[:3])
        if len(down) != len(want):
            raise ValueError(
                f"down_block_additional_residuals has {len(down)} arrays; this UNet has {len(want)} skip "
                f"states, shaped {want}"
            )
        for i, (r, s) in enumerate([*zip(down, want), (mid, want_mid)]):
            if tuple(r.shape) not in (s, (s[0], 1, 1, s[3])):
                what = "mid_block_additional_residual" if i == len(want) else f"down_block_additional_residuals[{i}]"
                raise ValueError(f"{what} must be {s} (or {(s[0], 1, 1, s[3])}, pooled); got {tuple(r.shape)}")
