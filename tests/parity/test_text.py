"""jdpt's CLIP and T5 text encoders vs transformers' PyTorch models on small random configs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jdpt
from jdpt.models import clip, t5
from jdpt.models.attention import AttentionPlan, attention_layer_names, plan_layers
from tests.reference import assert_parity, torch_module

VOCAB = 100
CLIP_BASE = dict(vocab_size=VOCAB, max_position_embeddings=16, projection_dim=20, bos_token_id=0,
                 pad_token_id=1, layer_norm_eps=1e-5)
CLIP_CONFIGS = {
    # SD 1.x style: legacy eos_token_id=2 (pool at the largest id), padded with the eos token
    "quick_gelu-legacy_eos": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_hidden_layers=2, hidden_act="quick_gelu", eos_token_id=2,
                                  length=12, masked=False),
    # SDXL style: a real eos id (not the largest token), 3 heads of 16, padding attention mask
    "gelu-eos_id": dict(hidden_size=48, intermediate_size=40, num_attention_heads=3,
                        num_hidden_layers=3, hidden_act="gelu", eos_token_id=97, length=12,
                        masked=True),
    # one layer, 2 heads of 12, the full position table (16 tokens), tanh GELU
    "gelu_new-full_length": dict(hidden_size=24, intermediate_size=56, num_attention_heads=2,
                                 num_hidden_layers=1, hidden_act="gelu_new", eos_token_id=98,
                                 length=16, masked=True),
}
T5_BASE = dict(vocab_size=VOCAB, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)
T5_CONFIGS = {
    # original T5: relu, few buckets and a short max distance, 20 tokens reach the far buckets
    "relu": dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, feed_forward_proj="relu",
                 relative_attention_num_buckets=8, relative_attention_max_distance=6, length=20,
                 padding="right"),
    # T5 v1.1 (Flux/SD3): gated-gelu, heads * d_kv != d_model, left padding
    "gated-gelu": dict(d_model=40, d_kv=10, num_heads=2, d_ff=48, num_layers=3,
                       feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
                       relative_attention_max_distance=10, length=24, padding="left"),
    # gated-silu, one layer of 6 heads of 4, default 32 buckets / 128 max distance, no mask
    "gated-silu": dict(d_model=24, d_kv=4, num_heads=6, d_ff=32, num_layers=1,
                       feed_forward_proj="gated-silu", relative_attention_num_buckets=32,
                       relative_attention_max_distance=128, length=12, padding=None),
}
INPUT_KEYS = ("length", "masked", "padding")


def _randomize(model, seed: int) -> None:
    """Add noise to every weight (norm scales and biases too), so no mapping bug can hide."""
    torch = torch_module()
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _torch_model(kind: str, cfg: dict, seed: int = 0):
    torch = torch_module()
    import transformers

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.items() if k not in INPUT_KEYS}
    if kind == "T5EncoderModel":
        config = transformers.T5Config(**T5_BASE, **kwargs)
    else:
        config = transformers.CLIPTextConfig(**CLIP_BASE, **kwargs)
    model = getattr(transformers, kind)(config).eval()
    _randomize(model, seed)
    return model


def _clip_inputs(cfg: dict, seed: int = 0, batch: int = 3) -> tuple[np.ndarray, np.ndarray | None]:
    """Prompts of different lengths ending in the eos token, then padded with it (as SD's
    tokenizers do); the mask marks the tokens up to and including the first eos."""
    rng = np.random.default_rng(seed)
    length = cfg["length"]
    eos = VOCAB - 1 if cfg["eos_token_id"] == 2 else cfg["eos_token_id"]
    ids = rng.integers(3, VOCAB - 1, size=(batch, length))
    ids[ids == eos] = 3
    mask = np.zeros((batch, length), np.int32)
    for b, n in enumerate(np.linspace(2, length - 1, batch).astype(int)):
        ids[b, n:] = eos
        mask[b, : n + 1] = 1
    return ids.astype(np.int32), (mask if cfg["masked"] else None)


def _t5_inputs(cfg: dict, seed: int = 0, batch: int = 2) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    length = cfg["length"]
    ids = rng.integers(2, VOCAB, size=(batch, length)).astype(np.int32)
    if cfg["padding"] is None:
        return ids, None
    mask = np.ones((batch, length), np.int32)
    pad = slice(length - 7, None) if cfg["padding"] == "right" else slice(0, 7)
    mask[1, pad] = 0
    ids[1, pad] = 0
    return ids, mask


def _torch_call(ref, ids, mask, **kwargs):
    torch = torch_module()
    mask = None if mask is None else torch.from_numpy(mask).long()
    return ref(input_ids=torch.from_numpy(ids).long(), attention_mask=mask, **kwargs)


def _abstract_model(kind: str, config):
    module = t5 if kind == "T5EncoderModel" else clip
    return nnx.eval_shape(lambda: getattr(module, kind)(config, rngs=nnx.Rngs(0)))


def _random_model(kind: str, config, seed: int = 1):
    """A jdpt model with random weights, norm scales near 1 (drawn with numpy: building with
    ``nnx.Rngs`` would compile every initializer shape eagerly)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(_abstract_model(kind, config))
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        noise = rng.normal(size=var.get_value().shape).astype(np.float32)
        is_norm_scale = path[-1] in ("scale", "weight")
        var.set_value(jnp.asarray(1 + 0.1 * noise if is_norm_scale else 0.2 * noise))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@jax.jit
def _forward(model, ids, mask):
    """The model with all hidden states, jitted (one compilation beats op-by-op dispatch)."""
    return model(ids, mask, output_hidden_states=True)


def _check_clip(ours, ref, ids, mask, *, rtol: float = 1e-4) -> dict[str, float]:
    """Compare every output of a CLIP model with the PyTorch one; returns the relative errors."""
    out = _forward(ours, ids, mask)
    want = _torch_call(ref, ids, mask, output_hidden_states=True)
    tower = ref.text_model if hasattr(ref, "text_model") else ref
    pooled = _torch_call(tower, ids, mask).pooler_output
    errs = {
        "last_hidden_state": assert_parity(out.last_hidden_state, want.last_hidden_state, rtol=rtol,
                                           what="last_hidden_state"),
        "pooler_output": assert_parity(out.pooler_output, pooled, rtol=rtol, what="pooler_output"),
    }
    assert len(out.hidden_states) == len(want.hidden_states) == ref.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, want.hidden_states)):
        errs[f"hidden_states[{i}]"] = assert_parity(a, b, rtol=rtol, what=f"hidden_states[{i}]")
    np.testing.assert_array_equal(out.penultimate_hidden_state, out.hidden_states[-2])
    if hasattr(want, "text_embeds"):
        errs["text_embeds"] = assert_parity(out.text_embeds, want.text_embeds, rtol=rtol,
                                            what="text_embeds")
    else:
        assert out.text_embeds is None
    return errs


def _check_t5(ours, ref, ids, mask, *, rtol: float = 1e-4) -> dict[str, float]:
    out = _forward(ours, ids, mask)
    want = _torch_call(ref, ids, mask, output_hidden_states=True)
    errs = {"last_hidden_state": assert_parity(out.last_hidden_state, want.last_hidden_state,
                                               rtol=rtol, what="last_hidden_state")}
    assert len(out.hidden_states) == len(want.hidden_states) == ref.config.num_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, want.hidden_states)):
        errs[f"hidden_states[{i}]"] = assert_parity(a, b, rtol=rtol, what=f"hidden_states[{i}]")
    return errs


CASES = [("CLIPTextModel", n) for n in CLIP_CONFIGS] + [
    ("CLIPTextModelWithProjection", n) for n in CLIP_CONFIGS
] + [("T5EncoderModel", n) for n in T5_CONFIGS]


def _config(kind: str, name: str) -> dict:
    return (T5_CONFIGS if kind == "T5EncoderModel" else CLIP_CONFIGS)[name]


def _inputs(kind: str, cfg: dict):
    return (_t5_inputs if kind == "T5EncoderModel" else _clip_inputs)(cfg)


def _check(kind: str, ours, ref, ids, mask, **kwargs) -> dict[str, float]:
    return (_check_t5 if kind == "T5EncoderModel" else _check_clip)(ours, ref, ids, mask, **kwargs)


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{n}" for k, n in CASES])
def pair(request, tmp_path_factory):
    """(kind, config, torch model, its saved folder)."""
    kind, name = request.param
    cfg = _config(kind, name)
    ref = _torch_model(kind, cfg)
    folder = tmp_path_factory.mktemp(f"{kind}_{name}")
    ref.save_pretrained(folder)
    return kind, cfg, ref, folder


def test_parity_fp32(pair):
    """Every output (and every hidden state) of a folder saved by transformers matches in fp32."""
    kind, cfg, ref, folder = pair
    ours = jdpt.from_diffusers(folder)
    assert type(ours).__name__ == kind
    ids, mask = _inputs(kind, cfg)
    errs = _check(kind, ours, ref, ids, mask)
    print(f"{kind} max relative error {max(errs.values()):.2e}")


BF16_CASES = [
    ("CLIPTextModel", "gelu-eos_id"),
    ("CLIPTextModelWithProjection", "quick_gelu-legacy_eos"),
    ("T5EncoderModel", "gated-gelu"),
]
BF16 = {jnp.dtype(jnp.bfloat16)}


def _param_dtypes(model) -> set:
    return {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("kind,name", BF16_CASES)
def test_bf16(kind, name, tmp_path):
    """bf16 weights (loaded with ``dtype=bfloat16`` or built with ``param_dtype``) give bf16
    outputs close to the fp32 reference.

    Measured on the 9 parity configs: at most 1.9e-2 of the output scale jitted (2.3e-2 op by
    op); bound 5e-2.
    """
    cfg = _config(kind, name)
    ref = _torch_model(kind, cfg)
    ref.save_pretrained(tmp_path)
    ours = jdpt.from_diffusers(tmp_path, dtype=jnp.bfloat16)
    assert _param_dtypes(ours) == BF16
    ids, mask = _inputs(kind, cfg)
    errs = _check(kind, ours, ref, ids, mask, rtol=5e-2)
    print(f"{kind} bf16 max relative error {max(errs.values()):.2e}")

    cls = type(ours)
    built = nnx.eval_shape(lambda: cls(ours.config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    assert _param_dtypes(built) == BF16
    assert {x.dtype for x in jax.tree.leaves(jax.eval_shape(_forward, built, ids, mask))} == BF16


@pytest.mark.parametrize("kind", ["CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"])
def test_round_trip_to_transformers(kind, tmp_path):
    """A jdpt model written with to_diffusers loads in transformers and gives the same outputs."""
    torch = torch_module()
    import transformers

    name = "gated-gelu" if kind == "T5EncoderModel" else "gelu-eos_id"
    cfg = _config(kind, name)
    fields = {k: v for k, v in cfg.items() if k not in INPUT_KEYS}
    if kind == "T5EncoderModel":
        config = t5.T5Config(vocab_size=VOCAB, **fields)
    else:
        config = clip.CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=16,
                                     projection_dim=20, **fields)
    model = _random_model(kind, config)

    jdpt.weights.to_diffusers(model, tmp_path)
    ref, info = getattr(transformers, kind).from_pretrained(tmp_path, output_loading_info=True)
    ref.eval()
    assert not any(info.values()), f"transformers loading problems: {info}"
    assert ref.config.architectures == [kind]
    if kind == "T5EncoderModel":
        assert torch.equal(ref.encoder.embed_tokens.weight, ref.shared.weight)
    ids, mask = _inputs(kind, cfg)
    _check(kind, model, ref, ids, mask)


def test_t5_tied_embedding_keys(tmp_path):
    """transformers 5 writes only ``shared.weight``; files with ``encoder.embed_tokens.weight``
    beside it (older transformers) or instead of it load the same model."""
    cfg = T5_CONFIGS["relu"]
    ref = _torch_model("T5EncoderModel", cfg)
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "shared.weight" in tensors and "encoder.embed_tokens.weight" not in tensors
    ids, mask = _t5_inputs(cfg)
    want = _forward(jdpt.from_diffusers(tmp_path), ids, mask).last_hidden_state
    for variant in ("both", "embed_tokens_only"):
        changed = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"]})
        if variant == "embed_tokens_only":
            del changed["shared.weight"]
        save_file(changed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        got = _forward(jdpt.from_diffusers(tmp_path), ids, mask).last_hidden_state
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=variant)


def test_clip_hub_layout_keys(tmp_path):
    """Hub checkpoints (SD's text_encoder) keep the ``text_model.`` prefix and older ones the
    ``position_ids`` buffer; they load like transformers 5's prefix-less files, and jdpt writes
    the hub layout."""
    cfg = CLIP_CONFIGS["quick_gelu-legacy_eos"]
    ref = _torch_model("CLIPTextModel", cfg)
    ref.save_pretrained(tmp_path / "v5")
    tensors = load_file(tmp_path / "v5" / "model.safetensors")
    assert all(not k.startswith("text_model.") for k in tensors)
    ours = jdpt.from_diffusers(tmp_path / "v5")
    hub = {f"text_model.{k}": v for k, v in tensors.items()}
    hub["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    (tmp_path / "hub").mkdir()
    save_file(hub, str(tmp_path / "hub" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    ids, _ = _clip_inputs(cfg)
    np.testing.assert_array_equal(
        _forward(jdpt.from_diffusers(tmp_path / "hub"), ids, None).pooler_output,
        _forward(ours, ids, None).pooler_output,
    )
    assert set(jdpt.weights.state_dict(ours)) == set(hub) - {"text_model.embeddings.position_ids"}


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    torch = torch_module()
    length = 300
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for num_buckets, max_distance in [(32, 128), (8, 6), (16, 10), (6, 5), (64, 200)]:
        want = T5Attention._relative_position_bucket(offsets, True, num_buckets, max_distance)
        got = t5.relative_position_buckets(
            length, num_buckets=num_buckets, max_distance=max_distance
        )
        np.testing.assert_array_equal(got, want.numpy(), err_msg=f"{num_buckets=} {max_distance=}")


def _tiny(kind: str, *, abstract: bool = False):
    if kind == "T5EncoderModel":
        config = t5.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, num_heads=4, d_ff=32,
                               num_layers=2, relative_attention_num_buckets=8,
                               relative_attention_max_distance=6)
    else:
        config = clip.CLIPTextWithProjectionConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, projection_dim=8,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8,
        )
    return _abstract_model(kind, config) if abstract else _random_model(kind, config)


@pytest.mark.parametrize("kind", ["CLIPTextModelWithProjection", "T5EncoderModel"])
def test_bad_inputs_raise(kind):
    model = _tiny(kind, abstract=True)  # inputs are checked before any computation
    ids = np.ones((2, 6), np.int32)
    with pytest.raises(ValueError, match=r"integer token ids of shape \[B, L\].*\(6,\).*\[None\]"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"integer token ids.*float32"):
        model(ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 6\)"
                                         r".*got \(2, 5\)"):
        model(ids, np.ones((2, 5), np.int32))
    if kind == "T5EncoderModel":
        out = jax.eval_shape(lambda m, i: m(i), model, np.ones((1, 40), np.int32))
        assert out.last_hidden_state.shape == (1, 40, 16)  # relative positions: any length
    else:
        with pytest.raises(ValueError, match=r"9 tokens.*max_position_embeddings=8"
                                             r".*max_length=8, truncation=True"):
            model(np.ones((2, 9), np.int32))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match=r"hidden_size=30 must be divisible by num_attention_h"):
        clip.CLIPTextConfig(hidden_size=30, num_attention_heads=4).validate()
    with pytest.raises(ValueError, match=r"hidden_act='swiglu' is not supported; use one of"):
        clip.CLIPTextConfig.from_dict({"hidden_act": "swiglu"})
    with pytest.raises(ValueError, match=r"projection_dim=None"):
        clip.CLIPTextWithProjectionConfig(projection_dim=None).validate()
    with pytest.raises(ValueError, match=r"feed_forward_proj='gelu-gated' must be 'ACT' or"):
        t5.T5Config(feed_forward_proj="gelu-gated").validate()
    with pytest.raises(ValueError, match=r"relative_attention_num_buckets=2"):
        t5.T5Config(relative_attention_num_buckets=2).validate()
    assert t5.T5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    # the architecture written follows the model class, whichever CLIP config it was given
    plain = clip.CLIPTextConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=2, vocab_size=10, projection_dim=4)
    with_proj = nnx.eval_shape(lambda: clip.CLIPTextModelWithProjection(plain, rngs=nnx.Rngs(0)))
    assert with_proj.config.to_dict()["architectures"] == ["CLIPTextModelWithProjection"]
    assert dataclasses.asdict(with_proj.config) == dataclasses.asdict(plain)


@pytest.mark.parametrize("kind", ["CLIPTextModelWithProjection", "T5EncoderModel"])
def test_attention_probs_and_layer_names(kind, tmp_path):
    """Every attention layer is named; a plan on one layer sows its [B, T, T] probabilities,
    which equal transformers' head-averaged attentions (CLIP: causal, T5: padding keys zero)."""
    torch_module()
    import transformers

    model = _tiny(kind)
    names = attention_layer_names(model)
    if kind == "T5EncoderModel":
        assert names == [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    else:
        assert names == [f"text_model.encoder.layers.{i}.self_attn" for i in range(2)]
    plans = plan_layers(names, r".*\.1\..*", AttentionPlan(return_probs=True))
    ids = np.arange(2, 14, dtype=np.int32).reshape(2, 6)
    mask = np.ones((2, 6), np.int32)
    mask[1, 4:] = 0
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):  # the functional pattern: merge, then call under nnx.capture
        m = nnx.merge(graphdef, state)
        return nnx.capture(m, nnx.Intermediate)(ids, mask, plans=plans)

    out, sown = run(state)
    sown = nnx.to_flat_state(sown)
    assert len(sown) == 1
    path, var = sown[0]
    assert ".".join(map(str, path)).startswith(names[1])
    (probs,) = var.get_value()
    assert probs.shape == (2, 6, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    if kind == "T5EncoderModel":
        assert np.all(np.asarray(probs)[1, :, 4:] == 0)
    else:
        assert np.all(np.triu(np.asarray(probs), k=1) == 0)

    jdpt.weights.to_diffusers(model, tmp_path)
    ref = getattr(transformers, kind).from_pretrained(tmp_path, attn_implementation="eager").eval()
    want = _torch_call(ref, ids, mask, output_attentions=True).attentions[1].mean(1)
    assert_parity(probs, want, what="attention probabilities")
    assert out.last_hidden_state.shape == (2, 6, 16)
