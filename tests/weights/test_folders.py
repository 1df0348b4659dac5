"""from_diffusers / to_diffusers on folders the tests write: layouts, hub cache, and bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jdpt
from jdpt.models.flux import FluxConfig, FluxTransformer
from jdpt.weights import WeightsError, from_diffusers, state_dict, to_diffusers

TINY = FluxConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
                  axes_dims_rope=(2, 2, 4))


@pytest.fixture(scope="module")
def model():
    return FluxTransformer(TINY, rngs=nnx.Rngs(0))


@pytest.fixture
def folder(model, tmp_path):
    return to_diffusers(model, tmp_path / "transformer")


def _same_params(a, b):
    sa, sb = state_dict(a), state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_round_trip_single_file(model, folder):
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel" and config["axes_dims_rope"] == [2, 2, 4]
    loaded = from_diffusers(folder)
    assert isinstance(loaded, FluxTransformer) and loaded.config == TINY
    _same_params(model, loaded)


def test_reference_layout(model, folder):
    """Linear kernels are stored transposed ([out, in]) under the diffusers key names."""
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    kernel = np.asarray(model.transformer_blocks[0].attn.to_q.kernel.get_value())
    np.testing.assert_array_equal(tensors["transformer_blocks.0.attn.to_q.weight"], kernel.T)
    assert "transformer_blocks.0.ff.net.0.proj.weight" in tensors
    assert "transformer_blocks.0.attn.to_out.0.bias" in tensors
    assert "time_text_embed.timestep_embedder.linear_2.weight" in tensors


def test_round_trip_sharded(model, tmp_path):
    to_diffusers(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    _same_params(model, from_diffusers(tmp_path))


def test_dtype_cast(folder):
    m16 = from_diffusers(folder, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(m16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


def _hub_cache(root, repo_id, component_folder, revision="main"):
    """Lay a folder out as huggingface_hub's cache stores a downloaded snapshot."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(sha)
    snapshot = repo / "snapshots" / sha
    shutil.copytree(component_folder, snapshot / "transformer")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"],
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    return snapshot


def test_hub_cache(model, folder, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/tiny-flux", folder)
    _same_params(model, from_diffusers("acme/tiny-flux", subfolder="transformer", cache_dir=cache))
    # The default cache location ($HF_HUB_CACHE) is honoured too.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _same_params(model, from_diffusers("acme/tiny-flux", subfolder="transformer"))
    with pytest.raises(WeightsError, match="pipeline folder.*subfolder=.*'transformer', 'vae'"):
        from_diffusers("acme/tiny-flux", cache_dir=cache)
    with pytest.raises(WeightsError, match="neither a local folder nor in the Hugging Face cache.*hf download"):
        from_diffusers("acme/not-downloaded", subfolder="transformer", cache_dir=cache)


def test_missing_folder(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        from_diffusers(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no subfolder 'vae'"):
        from_diffusers(tmp_path, subfolder="vae")
    with pytest.raises(WeightsError, match="no config.json"):
        from_diffusers(tmp_path)


def test_truncated_safetensors(folder):
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    for cut in (data[: len(data) - 100], data[:50]):
        path.write_bytes(cut)
        with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors: not a readable "
                                               r"safetensors file .* truncated or damaged"):
            from_diffusers(folder)


def test_key_errors_are_listed_together(folder):
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["proj_out.weight"]
    tensors["transformer_blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    tensors["x_embedder.weight"] = np.zeros((16, 3), np.float32)
    save_file(tensors, path)
    with pytest.raises(WeightsError) as err:
        from_diffusers(folder)
    message = str(err.value)
    assert "missing keys (1): ['proj_out.weight']" in message
    assert "unexpected keys (1): ['transformer_blocks.0.attn.extra.weight']" in message
    assert "x_embedder.weight: file (16, 3), model (16, 8)" in message
    assert str(folder) in message


def test_unknown_class_and_bad_config(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "WanTransformer3DModel"}))
    with pytest.raises(WeightsError, match="no port of 'WanTransformer3DModel'.*FluxTransformer2DModel"):
        from_diffusers(folder)
    (folder / "config.json").write_text(json.dumps({**config, "axes_dims_rope": [2, 2, 2]}))
    with pytest.raises(ValueError, match=r"axes_dims_rope \(2, 2, 2\) must sum to attention_head_dim 8"):
        from_diffusers(folder)
    (folder / "config.json").write_text(json.dumps({**config, "new_feature": 3}))
    with pytest.warns(UserWarning, match=r"not used by jdpt.*\['new_feature'\]"):
        from_diffusers(folder)


def test_pickles_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(WeightsError, match="never loads pickles"):
        from_diffusers(tmp_path)


def test_public_api():
    assert jdpt.from_diffusers is from_diffusers
    assert jdpt.weights.from_diffusers is from_diffusers
