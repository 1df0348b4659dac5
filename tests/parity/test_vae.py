"""AutoencoderKL vs diffusers AutoencoderKL on small random configs (fp32 and bf16, CPU).

Torch runs NCHW, jdpt NHWC: inputs and outputs are transposed for the comparison. Each config
is compiled once per dtype (CPU compilation dominates the run time), so one jitted function
returns every output the tests compare.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdpt
from jdpt.models.attention import AttentionPlan, attention_layer_names, plan_layers
from jdpt.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from tests.reference import assert_parity, to_numpy, torch_module

CONFIGS = {
    # SD-like: quant convs, mid attention, 2 blocks, 2 resnets per encoder block
    "sd": dict(block_out_channels=(8, 16), layers_per_block=2, latent_channels=4,
               norm_num_groups=4, image=(16, 24)),
    # Flux-like: 16 latent channels, no quant convs, shift factor, 3 blocks, 1 resnet per block
    "flux": dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=16,
                 norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159, image=(24, 40)),
    # one block (no resampling), no mid attention, grey in / 2 channels out, SDXL-style
    # per-channel latent statistics, odd image size
    "plain": dict(block_out_channels=(12,), layers_per_block=2, latent_channels=4,
                  norm_num_groups=6, in_channels=1, out_channels=2, act_fn="swish",
                  mid_block_add_attention=False, scaling_factor=0.13025,
                  latents_mean=(0.1, -0.2, 0.3, 0.05), latents_std=(1.5, 0.8, 1.1, 2.0),
                  image=(9, 14)),
}
BATCH = 2
# Compiling dominates these tests on the CPU; LLVM's -O0 halves it and leaves the numerics alone.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# bf16 vs fp32, max error relative to max(1, max|fp32 output|). Measured on these random models:
# 4.2e-2 (flux forward; mean/logvar <= 1.8e-2) and 2.4e-2 (plain forward), where diffusers' own
# bf16 model is 3.2e-2 and 2.6e-2 off its fp32 output on the same weights and input: the error is
# bf16's, not the port's. The bound leaves a 2.4x margin.
BF16_TOL = 0.1


def _model_kwargs(cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    kw = {k: v for k, v in cfg.items() if k != "image"}
    return {**kw, "down_block_types": ("DownEncoderBlock2D",) * n,
            "up_block_types": ("UpDecoderBlock2D",) * n}


def _torch_vae(cfg: dict):
    torch = torch_module()
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(0)
    model = TorchAutoencoderKL(**_model_kwargs(cfg)).eval()
    # random everything, so a zero bias or a unit norm scale cannot hide a mapping bug
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p) * 0.05
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 2 * noise)
            else:
                p.add_(noise)
    return model


def _nchw(x) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x).transpose(0, 3, 1, 2))


def _nhwc(x) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x).transpose(0, 2, 3, 1))


def _pipeline_scale(z: np.ndarray, config: AutoencoderKLConfig) -> np.ndarray:
    """Raw latents -> denoiser latents, written as the diffusers pipelines write it."""
    if config.latents_mean is not None:  # SDXL (img2img): (z - mean) * s / std
        mean, std = np.asarray(config.latents_mean), np.asarray(config.latents_std)
        return (z - mean) * config.scaling_factor / std
    if config.shift_factor is not None:  # Flux / SD3: (z - shift) * s
        return (z - config.shift_factor) * config.scaling_factor
    return z * config.scaling_factor  # SD 1.x / 2.x


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _fp32_outputs(model, x, z, latents, key):
    post = model.encode(x)
    return {
        "mean": post.mean,
        "logvar": post.logvar,
        "forward": model(x),
        "forward_sampled": model(x, sample_posterior=True, key=key),
        "decode": model.decode(z),
        "encode_latents": model.encode_latents(x),
        "encode_latents_sampled": model.encode_latents(x, key),
        "decode_latents": model.decode_latents(latents),
    }


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _bf16_outputs(model, x):
    post = model.encode(x)
    return {"mean": post.mean, "logvar": post.logvar, "forward": model(x)}


class Case:
    """One config: torch model, its saved folder, the jdpt model, inputs, and both outputs."""

    def __init__(self, name: str, folder):
        self.name, self.cfg, self.folder = name, CONFIGS[name], folder
        self.ref = _torch_vae(self.cfg)
        self.ref.save_pretrained(folder, safe_serialization=True)
        self.model = jdpt.from_diffusers(folder)
        config = self.model.config
        h, w = self.cfg["image"]
        f = config.downsample_factor
        rng = np.random.default_rng(1)
        self.x = rng.normal(size=(BATCH, h, w, config.in_channels)).astype(np.float32)
        self.z = rng.normal(size=(BATCH, h // f, w // f, config.latent_channels)).astype(np.float32)
        self.latents = _pipeline_scale(self.z, config).astype(np.float32)
        self.key = jax.random.key(7)
        self.eps = np.asarray(jax.random.normal(self.key, self.z.shape, jnp.float32))
        args = (jnp.asarray(self.x), jnp.asarray(self.z), jnp.asarray(self.latents), self.key)
        self.ours = {k: np.asarray(v) for k, v in _fp32_outputs(self.model, *args).items()}
        self.torch_out = self.torch_outputs(self.ref)

    def torch_outputs(self, ref) -> dict[str, np.ndarray]:
        """The reference of every output of ``_fp32_outputs``, NHWC (``ref`` is a torch model)."""
        import torch

        x, z = torch.from_numpy(_nchw(self.x)), torch.from_numpy(_nchw(self.z))
        post = ref.encode(x).latent_dist
        sample = post.mean + post.std * torch.from_numpy(_nchw(self.eps))
        out = {
            "mean": post.mean,
            "logvar": post.logvar,
            "forward": ref(x).sample,
            "forward_sampled": ref.decode(sample).sample,
            "decode": ref.decode(z).sample,
        }
        out = {k: _nhwc(v) for k, v in out.items()}
        config = self.model.config
        out["encode_latents"] = _pipeline_scale(out["mean"], config)
        out["encode_latents_sampled"] = _pipeline_scale(_nhwc(sample), config)
        out["decode_latents"] = out["decode"]
        return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(f"vae_{request.param}"))


def test_fp32_parity(case):
    """Encode (mean, logvar), decode, and the forward pass match diffusers."""
    for what in ("mean", "logvar", "decode", "forward"):
        assert_parity(case.ours[what], case.torch_out[what], what=f"{case.name}: {what}")
    config, (h, w) = case.model.config, case.cfg["image"]
    f = config.downsample_factor
    assert case.ours["mean"].shape == (BATCH, h // f, w // f, config.latent_channels)
    assert case.ours["forward"].shape == (BATCH, h, w, config.out_channels)


def test_posterior_sampling(case):
    """A posterior sample is mean + std * eps, eps = normal(key); forward decodes it."""
    post = DiagonalGaussian(jnp.asarray(case.ours["mean"]), jnp.asarray(case.ours["logvar"]))
    np.testing.assert_array_equal(post.sample(case.key), post.mean + post.std * case.eps)
    assert_parity(case.ours["forward_sampled"], case.torch_out["forward_sampled"],
                  what=f"{case.name}: forward(sample_posterior=True)")
    with pytest.raises(ValueError, match="sample_posterior=True needs a PRNG key"):
        case.model(jnp.asarray(case.x), sample_posterior=True)


def test_latent_scaling_follows_the_pipelines(case):
    """SD: z * s; Flux/SD3: (z - shift) * s; SDXL with statistics: (z - mean) * s / std."""
    for what in ("encode_latents", "encode_latents_sampled", "decode_latents"):
        assert_parity(case.ours[what], case.torch_out[what], what=f"{case.name}: {what}")


def test_round_trip_through_diffusers(case, tmp_path):
    """jdpt -> to_diffusers -> diffusers from_pretrained reproduces the original torch model."""
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    folder = jdpt.weights.to_diffusers(case.model, tmp_path)
    back = TorchAutoencoderKL.from_pretrained(folder).eval()
    assert sorted(back.state_dict()) == sorted(case.ref.state_dict())
    again = case.torch_outputs(back)
    for what, ref in case.torch_out.items():
        np.testing.assert_array_equal(again[what], ref, err_msg=f"{case.name}: {what}, round trip")


@pytest.mark.parametrize("case", ["flux", "plain"], indirect=True)  # with and without attention
def test_bf16(case):
    model = jdpt.from_diffusers(case.folder, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
    for what, ours in _bf16_outputs(model, jnp.asarray(case.x)).items():
        assert ours.dtype == jnp.bfloat16, f"{case.name}: bf16 {what} is {ours.dtype}"
        assert_parity(ours, case.ours[what], rtol=BF16_TOL, what=f"{case.name}: bf16 {what}")


def test_bf16_param_dtype_gives_bf16_activations():
    """Every conv and projection of a ``param_dtype=bf16`` model runs in bf16; only the attention
    logits (``q k^T``, fp32 by design) do not."""
    model = _abstract_vae(block_out_channels=(8, 16), norm_num_groups=4, param_dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda m, x: m(x))(model, x))
    convs = re.findall(r"(\w+)\[[\d,]*\] = conv_general_dilated", jaxpr)
    dots = re.findall(r"(\w+)\[[\d,]*\] = dot_general", jaxpr)
    assert len(convs) > 10 and set(convs) == {"bf16"}
    assert sorted(dots) == ["bf16"] * 10 + ["f32"] * 2  # 2 layers: q, k, v, p v, out; logits
    assert jax.eval_shape(lambda m, x: m(x), model, x).dtype == jnp.bfloat16


def test_diagonal_gaussian_matches_diffusers():
    """Clamp, std, var and KL (to N(0, I) and to another posterior) as diffusers computes them."""
    torch = torch_module()
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(2)
    moments = rng.normal(size=(BATCH, 3, 5, 8)).astype(np.float32)
    wide = moments.copy()
    wide[..., 4:] *= 40.0  # log-variances far outside [-30, 20] exercise the clamp
    ours = DiagonalGaussian.from_moments(wide)
    ref = DiagonalGaussianDistribution(torch.from_numpy(_nchw(wide)))
    assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
    for what in ("mean", "logvar", "std", "var"):
        assert_parity(getattr(ours, what), _nhwc(getattr(ref, what)), rtol=1e-6, what=what)

    other_moments = rng.normal(size=moments.shape).astype(np.float32)
    ours = DiagonalGaussian.from_moments(moments)
    other = DiagonalGaussian.from_moments(other_moments)
    ref = DiagonalGaussianDistribution(torch.from_numpy(_nchw(moments)))
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(_nchw(other_moments)))
    assert ours.kl().shape == (BATCH,)
    assert_parity(ours.kl(), ref.kl(), rtol=1e-6, what="kl to N(0, I)")
    assert_parity(ours.kl(other), ref.kl(ref_other), rtol=1e-6, what="kl to another posterior")
    assert ours.mode() is ours.mean

    moments = np.tile(np.float32([0.5, np.log(4.0)]), (4096, 1, 1, 1))  # N(0.5, 2^2)
    z = np.asarray(DiagonalGaussian.from_moments(moments).sample(jax.random.key(4)))
    assert abs(z.mean() - 0.5) < 0.1 and abs(z.std() - 2.0) < 0.1


def _abstract_vae(param_dtype=jnp.float32, **config) -> AutoencoderKL:
    """A model of ``ShapeDtypeStruct`` leaves (no memory, no compile): enough to trace."""
    n = len(config["block_out_channels"])
    config = AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * n,
                                 up_block_types=("UpDecoderBlock2D",) * n, **config)
    return nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def test_bad_input_errors():
    model = _abstract_vae(block_out_channels=(8, 8, 8), norm_num_groups=4)
    nchw = r"in_channels=3 .*got shape \(1, 3, 8, 8\).*NCHW.*transpose"
    with pytest.raises(ValueError, match=nchw):
        model.encode(jnp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"in_channels=3 .*got shape \(1, 8, 8, 4\)"):
        model.encode(jnp.zeros((1, 8, 8, 4)))
    indivisible = r"12x10 is not divisible by .* factor 4.*pad it \(e.g. to 12x12\) or crop"
    with pytest.raises(ValueError, match=indivisible):
        model.encode(jnp.zeros((1, 12, 10, 3)))
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]; got rank 3 .*batch axis"):
        model.encode(jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]; got rank 5"):
        model(jnp.zeros((1, 1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"latent_channels=4 .*got shape \(1, 2, 2, 16\)"):
        model.decode(jnp.zeros((1, 2, 2, 16)))
    with pytest.raises(ValueError, match=r"latent_channels=4 .*got shape \(1, 2, 2, 16\)"):
        model.decode_latents(jnp.zeros((1, 2, 2, 16)))


def test_bad_config_errors():
    groups = r"\(8, 12\) must be positive multiples of norm_num_groups=8"
    with pytest.raises(ValueError, match=groups):
        _abstract_vae(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match="'AttnDownEncoderBlock2D'.*only 'DownEncoderBlock2D'"):
        AutoencoderKLConfig(down_block_types=("AttnDownEncoderBlock2D",)).validate()
    with pytest.raises(ValueError, match="1 down_block_types .* for 2 block_out_channels"):
        AutoencoderKLConfig(block_out_channels=(32, 64),
                            up_block_types=("UpDecoderBlock2D",) * 2).validate()
    with pytest.raises(ValueError, match="both be None or both hold latent_channels=4"):
        AutoencoderKLConfig(latents_mean=(0.0,) * 4).validate()
    with pytest.raises(ValueError, match="act_fn='mish' is not supported"):
        AutoencoderKLConfig(act_fn="mish").validate()


@functools.partial(jax.jit, static_argnames="method", compiler_options=FAST_COMPILE)
def _sown_probs(model, inputs, plans, method: str) -> dict[str, jax.Array]:
    """Run ``getattr(model, method)(inputs, plans=plans)``; the probabilities it sowed by path."""
    _, sown = nnx.capture(getattr(model, method), nnx.Intermediate)(inputs, plans=plans)
    return {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(sown)}


@pytest.mark.parametrize("case", ["sd"], indirect=True)
def test_attention_plan_reaches_mid_block_attention(case):
    names = attention_layer_names(case.model)
    assert sorted(names) == ["decoder.mid_block.attentions.0", "encoder.mid_block.attentions.0"]
    no_attention = _abstract_vae(block_out_channels=(8,), norm_num_groups=4,
                                 mid_block_add_attention=False)
    assert attention_layer_names(no_attention) == []

    probs = _sown_probs(case.model, case.x, AttentionPlan(return_probs=True), "__call__")
    assert sorted(probs) == [f"{n}.attn_probs" for n in sorted(names)]
    h, w = case.cfg["image"]
    tokens = (h // 2) * (w // 2)  # the mid blocks run at the latent resolution
    for (p,) in probs.values():
        assert p.shape == (BATCH, tokens, tokens)
        np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-5)

    only_decoder = plan_layers(names, r"decoder\..*", AttentionPlan(return_probs=True))
    probs = _sown_probs(case.model, case.z, only_decoder, "decode")
    assert list(probs) == ["decoder.mid_block.attentions.0.attn_probs"]
