"""T5 encoder (Raffel et al. 2020; v1.1 gated-GELU feed-forward): a Flax NNX port of
transformers' ``T5EncoderModel``, the text encoder of SD3 and Flux (inference: no dropout).

The module tree follows the hub checkpoints: attention layers are
``encoder.block.{i}.layer.0.SelfAttention``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jdpt.models.attention import AttentionPlan, LayerPlans, attention, resolve_plan, sow_probs
from jdpt.models.config import ModelConfig
from jdpt.models.layers import activation, dense, embed, param
from jdpt.models.tokens import check_tokens

Array = jax.Array
Plans = LayerPlans | AttentionPlan | None


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    """transformers ``T5Config`` for ``T5EncoderModel`` (defaults: google-t5/t5-small).

    ``feed_forward_proj`` is ``"ACT"`` (``wo(act(wi(x)))``) or ``"gated-ACT"``
    (``wo(act(wi_0(x)) * wi_1(x))``); ``"gated-gelu"`` means the tanh GELU, as in transformers.
    """

    reference_class = "T5EncoderModel"
    library = "transformers"
    model_type = "t5"
    # Derived from feed_forward_proj, decoder-only or generation settings: no effect on the encoder.
    ignored_keys = frozenset({
        "dense_act_fn", "is_gated_act", "num_decoder_layers", "scale_decoder_outputs",
        "eos_token_id", "n_positions", "output_past",
    })

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.removeprefix("gated-")

    def validate(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} must be 'ACT' or 'gated-ACT', "
                "e.g. 'relu' (T5) or 'gated-gelu' (T5 v1.1, Flux's and SD3's T5-XXL)"
            )
        activation(self.dense_act_fn, field="feed_forward_proj activation")
        exact = self.relative_attention_num_buckets // 4
        if exact < 1 or self.relative_attention_max_distance <= exact:
            raise ValueError(
                f"relative_attention_num_buckets={self.relative_attention_num_buckets} and "
                f"relative_attention_max_distance={self.relative_attention_max_distance}: need at "
                "least 4 buckets and a max distance above a quarter of them (T5 uses 32 and 128)"
            )


def relative_position_buckets(length: int, *, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucket of the offset ``key - query`` for every pair: ``[L, L]`` int32.

    Half of the buckets hold keys after the query, half the rest; within a half, offsets below
    a quarter of ``num_buckets`` get one bucket each, larger ones log-spaced buckets up to
    ``max_distance``, beyond which all share the last. Computed on the host in float32, exactly as
    transformers rounds it.
    """
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = np.abs(offset)
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / exact) / np.float32(
        math.log(max_distance / exact)
    )
    far = np.minimum(exact + (log_ratio * (half - exact)).astype(np.int32), half - 1)
    return ((offset > 0) * half + np.where(dist < exact, dist, far)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """T5's RMS norm: ``weight * x / rms(x)``, no mean subtraction or bias, statistics in fp32;
    the normalised value is cast to a half-precision weight's dtype before the scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), ("embed",))

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...]
        if jnp.finfo(weight.dtype).bits < 32:
            y = y.astype(weight.dtype)
        return weight * y


def _t5_norm(config: T5Config, param_dtype) -> T5LayerNorm:
    return T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, param_dtype=param_dtype)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive relative-position bias; only the first
    block owns the bias table (``relative_attention_bias [num_buckets, heads]``)."""

    def __init__(self, config: T5Config, *, has_relative_bias: bool, layer_name: str,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.layer_name = layer_name
        self.heads, self.head_dim = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.q = dense(config.d_model, inner, ("embed", "heads"), use_bias=False, **kw)
        self.k = dense(config.d_model, inner, ("embed", "heads"), use_bias=False, **kw)
        self.v = dense(config.d_model, inner, ("embed", "heads"), use_bias=False, **kw)
        self.o = dense(inner, config.d_model, ("heads", "embed"), use_bias=False, **kw)
        if has_relative_bias:
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance
            self.relative_attention_bias = embed(
                self.num_buckets, self.heads, axes=(None, None), **kw
            )

    def position_bias(self, length: int) -> Array:
        """``[1, H, L, L]`` additive logit bias of a length-``L`` sequence."""
        buckets = relative_position_buckets(
            length, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)[None]

    def __call__(self, x: Array, bias: Array, mask: Array | None, plans: Plans) -> Array:
        """x: ``[B, L, d_model]``; bias ``[1, H, L, L]``; mask ``[B, 1, 1, L]`` or None."""
        b, n, _ = x.shape

        def heads(y):
            return y.reshape(b, n, self.heads, self.head_dim)

        out, probs = attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
            plan=resolve_plan(plans, self.layer_name), bias=bias, mask=mask, scale=1.0,
        )
        sow_probs(self, probs)
        return self.o(out.reshape(b, n, self.heads * self.head_dim))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_bias: bool, name: str, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.SelfAttention = T5Attention(
            config, has_relative_bias=has_relative_bias, layer_name=f"{name}.SelfAttention",
            rngs=rngs, param_dtype=param_dtype,
        )
        self.layer_norm = _t5_norm(config, param_dtype)

    def __call__(self, x: Array, bias: Array, mask: Array | None, plans: Plans) -> Array:
        return x + self.SelfAttention(self.layer_norm(x), bias, mask, plans)


class T5DenseActDense(nnx.Module):
    """``wo(act(wi(x)))``, or gated ``wo(act(wi_0(x)) * wi_1(x))``; no biases."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(use_bias=False, rngs=rngs, param_dtype=param_dtype)
        self.act = activation(config.dense_act_fn)
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = dense(config.d_model, config.d_ff, ("embed", "mlp"), **kw)
            self.wi_1 = dense(config.d_model, config.d_ff, ("embed", "mlp"), **kw)
        else:
            self.wi = dense(config.d_model, config.d_ff, ("embed", "mlp"), **kw)
        self.wo = dense(config.d_ff, config.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5LayerFF(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.DenseReluDense = T5DenseActDense(config, rngs=rngs, param_dtype=param_dtype)
        self.layer_norm = _t5_norm(config, param_dtype)

    def __call__(self, x: Array) -> Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    """Pre-norm self-attention then feed-forward (``layer.0``, ``layer.1``)."""

    def __init__(self, config: T5Config, *, index: int, rngs: nnx.Rngs, param_dtype=jnp.float32):
        name = f"encoder.block.{index}.layer.0"
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.layer = nnx.List([
            T5LayerSelfAttention(config, has_relative_bias=index == 0, name=name, **kw),
            T5LayerFF(config, **kw),
        ])

    def __call__(self, x: Array, bias: Array, mask: Array | None, plans: Plans) -> Array:
        return self.layer[1](self.layer[0](x, bias, mask, plans))


class T5Stack(nnx.Module):
    """The encoder blocks (sharing block 0's position bias) and the final norm."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.block = nnx.List([
            T5Block(config, index=i, rngs=rngs, param_dtype=param_dtype)
            for i in range(config.num_layers)
        ])
        self.final_layer_norm = _t5_norm(config, param_dtype)

    def __call__(self, x: Array, mask: Array | None, plans: Plans) -> tuple[Array, list[Array]]:
        """x: ``[B, L, d_model]`` embeddings -> (normed output, the input of every block)."""
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        states = []
        for block in self.block:
            states.append(x)
            x = block(x, bias, mask, plans)
        return self.final_layer_norm(x), states


@struct.dataclass
class T5EncoderOutput:
    """Outputs of :class:`T5EncoderModel`.

    Attributes:
        last_hidden_state: ``[B, L, d_model]`` after ``encoder.final_layer_norm``.
        hidden_states: with ``output_hidden_states=True``, ``num_layers + 1`` arrays
            ``[B, L, d_model]`` as transformers returns them: the embeddings, the outputs of
            blocks ``0 .. num_layers - 2``, then ``last_hidden_state``.
    """

    last_hidden_state: Array
    hidden_states: tuple[Array, ...] | None = None


class T5EncoderModel(nnx.Module):
    """transformers ``T5EncoderModel`` (the text encoder of SD3 and Flux).

    ``encoder.embed_tokens`` is tied to ``shared``: files may hold either key or both
    (transformers >= 5 writes ``shared.weight`` only, and so does jdpt). With bf16 weights every
    layer computes in bf16 (transformers keeps the ``wo`` projections in fp32).
    """

    config_class = T5Config
    torch_aliases = {"encoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        self.shared = embed(config.vocab_size, config.d_model, rngs=rngs, param_dtype=param_dtype)
        self.encoder = T5Stack(config, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 output_hidden_states: bool = False, plans: Plans = None) -> T5EncoderOutput:
        """Encode token ids.

        Args:
            input_ids: ``[B, L]`` integer ids (any length: positions are relative).
            attention_mask: optional ``[B, L]`` (1 = token, 0 = padding keys are ignored).
            output_hidden_states: also return the per-block states (see :class:`T5EncoderOutput`).
            plans: attention plans by layer name (``encoder.block.{i}.layer.0.SelfAttention``).

        Returns:
            :class:`T5EncoderOutput`.
        """
        ids, mask = check_tokens(type(self).__name__, input_ids, attention_mask)
        last, states = self.encoder(self.shared(ids), mask, plans)
        return T5EncoderOutput(
            last_hidden_state=last,
            hidden_states=(*states, last) if output_hidden_states else None,
        )
