"""CLIP text encoders (Radford et al. 2021): Flax NNX ports of transformers' ``CLIPTextModel``
and ``CLIPTextModelWithProjection`` (inference semantics: no dropout).

Which output a pipeline feeds to its denoiser:

- SD 1.x: ``last_hidden_state`` (final-layer-normed).
- SDXL / SD3: ``penultimate_hidden_state`` (= ``hidden_states[-2]``, *not* normed; call with
  ``output_hidden_states=True``) of both CLIP encoders, plus ``text_embeds`` of the projecting one
  as the pooled vector.
- Flux: ``pooler_output`` as the pooled vector.

The module tree (hence state-dict keys and attention layer names) follows the Hugging Face hub
checkpoints: both classes keep the ``text_model.`` prefix (``text_model.encoder.layers.{i}
.self_attn``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jdpt.models.attention import AttentionPlan, LayerPlans, attention, resolve_plan, sow_probs
from jdpt.models.config import ModelConfig
from jdpt.models.keys import torch_key_map
from jdpt.models.layers import activation, dense, embed, layer_norm
from jdpt.models.tokens import check_tokens

Array = jax.Array
Plans = LayerPlans | AttentionPlan | None


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """transformers ``CLIPTextConfig`` of ``CLIPTextModel`` (defaults: clip-vit-base-patch32).

    ``eos_token_id`` selects the pooled token: ``2`` keeps transformers' legacy rule (the position
    of the largest id), any other id the first position holding ``eos_token_id``.
    """

    reference_class = "CLIPTextModel"
    library = "transformers"
    model_type = "clip_text_model"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides the width"
            )
        activation(self.hidden_act, field="hidden_act")
        if not isinstance(self.eos_token_id, int):
            raise ValueError(
                f"eos_token_id={self.eos_token_id!r}: CLIP pools at the end-of-text token, so one "
                "integer id is required (49407 for OpenAI's CLIP tokenizer)"
            )


@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """The same config for ``CLIPTextModelWithProjection`` (adds ``text_projection``)."""

    reference_class = "CLIPTextModelWithProjection"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(
                f"projection_dim={self.projection_dim!r}: CLIPTextModelWithProjection needs the "
                "positive width of text_projection's output"
            )


@struct.dataclass
class CLIPTextOutput:
    """Outputs of the CLIP text encoders.

    Attributes:
        last_hidden_state: ``[B, L, D]`` last layer's output after ``final_layer_norm``.
        pooler_output: ``[B, D]`` ``last_hidden_state`` at the end-of-text token.
        hidden_states: with ``output_hidden_states=True``, ``num_hidden_layers + 1`` arrays
            ``[B, L, D]``: the embeddings, then every layer's output *without* the final norm.
        text_embeds: ``[B, projection_dim]`` ``text_projection(pooler_output)``
            (``CLIPTextModelWithProjection`` only).
    """

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...] | None = None
    text_embeds: Array | None = None

    @property
    def penultimate_hidden_state(self) -> Array:
        """``[B, L, D]`` output of the second-to-last layer, un-normed (SDXL's and SD3's tokens)."""
        if self.hidden_states is None:
            raise ValueError("no hidden states kept: call the model with output_hidden_states=True")
        return self.hidden_states[-2]


def _as_config(config: CLIPTextConfig, cls: type[CLIPTextConfig]) -> CLIPTextConfig:
    """``config`` as ``cls``, so that ``to_dict`` names the architecture of the model holding it."""
    if type(config) is cls:
        return config
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.token_embedding = embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = embed(
            config.max_position_embeddings, config.hidden_size, axes=(None, "embed"), **kw
        )

    def __call__(self, input_ids: Array) -> Array:
        """input_ids: ``[B, L]`` -> ``[B, L, D]``."""
        positions = jnp.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim: int, heads: int, *, layer_name: str, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.layer_name = layer_name
        self.heads = heads
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.q_proj = dense(dim, dim, ("embed", "heads"), **kw)
        self.k_proj = dense(dim, dim, ("embed", "heads"), **kw)
        self.v_proj = dense(dim, dim, ("embed", "heads"), **kw)
        self.out_proj = dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x: Array, mask: Array | None, plans: Plans) -> Array:
        """x: ``[B, L, D]``; mask: key padding ``[B, 1, 1, L]`` or None -> ``[B, L, D]``."""
        b, n, d = x.shape

        def heads(y):
            return y.reshape(b, n, self.heads, d // self.heads)

        out, probs = attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
            plan=resolve_plan(plans, self.layer_name), mask=mask, is_causal=True,
        )
        sow_probs(self, probs)
        return self.out_proj(out.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.act = activation(config.hidden_act)
        self.fc1 = dense(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = dense(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPTextConfig, *, name: str, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        dim = config.hidden_size
        self.self_attn = CLIPAttention(
            dim, config.num_attention_heads, layer_name=f"{name}.self_attn", **kw
        )
        self.layer_norm1 = layer_norm(dim, eps=config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = layer_norm(dim, eps=config.layer_norm_eps, **kw)

    def __call__(self, x: Array, mask: Array | None, plans: Plans) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), mask, plans)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, prefix: str, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.layers = nnx.List([
            CLIPEncoderLayer(config, name=f"{prefix}.layers.{i}", **kw)
            for i in range(config.num_hidden_layers)
        ])

    def __call__(self, x: Array, mask: Array | None, plans: Plans) -> tuple[Array, list[Array]]:
        """x: ``[B, L, D]`` -> (last layer output, ``[x, output of every layer]``)."""
        states = [x]
        for layer in self.layers:
            x = layer(x, mask, plans)
            states.append(x)
        return x, states


class CLIPTextTransformer(nnx.Module):
    """Embeddings, causal encoder, final layer norm and end-of-text pooling."""

    def __init__(self, config: CLIPTextConfig, *, prefix: str, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, prefix=f"{prefix}.encoder", **kw)
        self.final_layer_norm = layer_norm(config.hidden_size, eps=config.layer_norm_eps, **kw)

    def __call__(self, input_ids, attention_mask, *, output_hidden_states: bool, plans: Plans,
                 model: str) -> CLIPTextOutput:
        cfg = self.config
        ids, mask = check_tokens(
            model, input_ids, attention_mask, max_length=cfg.max_position_embeddings
        )
        x, states = self.encoder(self.embeddings(ids), mask, plans)
        last = self.final_layer_norm(x)
        if cfg.eos_token_id == 2:  # transformers' legacy rule for configs predating a fixed eos id
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = last[jnp.arange(ids.shape[0]), eos]
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class CLIPTextModel(nnx.Module):
    """transformers ``CLIPTextModel``: the CLIP text tower without projection.

    Keys are the hub checkpoints' (``text_model.encoder.layers.0.self_attn.q_proj.weight``);
    files written by transformers >= 5, which drops the ``text_model.`` prefix, load as well.
    """

    config_class = CLIPTextConfig
    torch_ignored = (r"(text_model\.)?embeddings\.position_ids",)

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config = _as_config(config, CLIPTextConfig)
        config.validate()
        self.config = config
        self.text_model = CLIPTextTransformer(
            config, prefix="text_model", rngs=rngs, param_dtype=param_dtype
        )

    @property
    def torch_aliases(self) -> dict[str, str]:
        """Prefix-less keys (as transformers >= 5 saves this class) -> this tree's keys."""
        return {key.removeprefix("text_model."): key for key in torch_key_map(self)}

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 output_hidden_states: bool = False, plans: Plans = None) -> CLIPTextOutput:
        """Encode token ids.

        Args:
            input_ids: ``[B, L]`` integer ids, ``L <= max_position_embeddings``.
            attention_mask: optional ``[B, L]`` (1 = token, 0 = padding); combined with the
                causal mask.
            output_hidden_states: also return every layer's output (see :class:`CLIPTextOutput`).
            plans: attention plans by layer name (``text_model.encoder.layers.{i}.self_attn``).

        Returns:
            :class:`CLIPTextOutput` (``text_embeds`` is None).
        """
        return self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                               plans=plans, model=type(self).__name__)


class CLIPTextModelWithProjection(nnx.Module):
    """transformers ``CLIPTextModelWithProjection``: the text tower plus ``text_projection``
    (no bias) of the pooled output (SDXL's second text encoder)."""

    config_class = CLIPTextWithProjectionConfig
    torch_ignored = CLIPTextModel.torch_ignored

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config = _as_config(config, CLIPTextWithProjectionConfig)
        config.validate()
        self.config = config
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.text_model = CLIPTextTransformer(config, prefix="text_model", **kw)
        self.text_projection = dense(
            config.hidden_size, config.projection_dim, ("embed", None), use_bias=False, **kw
        )

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 output_hidden_states: bool = False, plans: Plans = None) -> CLIPTextOutput:
        """As :meth:`CLIPTextModel.__call__`, plus ``text_embeds [B, projection_dim]``."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                              plans=plans, model=type(self).__name__)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))
