"""make_train_step / pmap_step on a tiny Flux: 1-device and 8-device meshes give the same numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jdpt.models.flux import image_ids
from jdpt.models.lora import add_lora
from jdpt.parallel import make_mesh, make_train_step, pmap_step
from tests.parallel.test_mesh import TINY, _per_device_bytes, random_model

# One double-stream block: the single-stream block only adds compile time here.
CONFIG = dataclasses.replace(TINY, num_single_layers=0)
B, TOKENS, TEXT = 16, 16, 4
IMG_IDS = image_ids(8, 8)  # an 8x8 latent packs into 4x4 = 16 tokens
TXT_IDS = jnp.zeros((TEXT, 3))
OPTIMIZER = optax.sgd(0.05, momentum=0.9)  # linear in the gradients: tight comparisons
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """XLA's optimisation passes are most of this file's run time on CPU; sharding (the SPMD
    partitioner) and every comparison below are unaffected by turning them off."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@dataclasses.dataclass(frozen=True)
class FlowMatching:
    """Rectified-flow loss; the noise level and noise come from the key, or from the batch."""

    noise_from_key: bool = True

    def velocity(self, model, frozen, batch, t, eps):
        x0 = batch["latents"]
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        return model(*frozen.cast((x_t, batch["context"], batch["pooled"])), t, IMG_IDS, TXT_IDS)

    def loss(self, params, frozen, batch, key):
        x0 = batch["latents"]
        if self.noise_from_key:
            k_t, k_eps = jax.random.split(key)
            t = jax.nn.sigmoid(jax.random.normal(k_t, x0.shape[:1]))
            eps = jax.random.normal(k_eps, x0.shape)
        else:
            t, eps = batch["t"], batch["noise"]
        v = self.velocity(frozen.model(params), frozen, batch, t, eps)
        return jnp.mean((v.astype(jnp.float32) - (eps - x0)) ** 2), {"t": t.mean()}


@dataclasses.dataclass(frozen=True)
class LoRAFlowMatching(FlowMatching):
    """Flow matching of a LoRA policy that also reports how far "the policy with zero adapters"
    is from the base model handed over in ``frozen.extra`` (0: the DPO-style reference)."""

    base: nnx.GraphDef | None = None

    def loss(self, params, frozen, batch, key):
        loss, metrics = super().loss(params, frozen, batch, key)
        t, eps = batch["t"], batch["noise"]
        reference = self.velocity(frozen.model(jax.tree.map(jnp.zeros_like, params)), frozen, batch, t, eps)
        base = self.velocity(nnx.merge(self.base, frozen.extra), frozen, batch, t, eps)
        return loss, {**metrics, "reference_gap": jnp.max(jnp.abs(reference - base))}


@pytest.fixture(scope="module")
def model() -> nnx.Module:
    return random_model(CONFIG, 0)


@pytest.fixture(scope="module")
def batch() -> dict:
    rng = np.random.default_rng(0)
    return {
        "latents": rng.normal(size=(B, TOKENS, CONFIG.in_channels)).astype(np.float32),
        "context": rng.normal(size=(B, TEXT, CONFIG.joint_attention_dim)).astype(np.float32),
        "pooled": rng.normal(size=(B, CONFIG.pooled_projection_dim)).astype(np.float32),
        "t": rng.uniform(size=(B,)).astype(np.float32),
        "noise": rng.normal(size=(B, TOKENS, CONFIG.in_channels)).astype(np.float32),
    }


def _train(init, step, model, batch, extra=None):
    """``STEPS`` steps; the final state and each step's metrics (host copies)."""
    state = init(model, extra)
    history = []
    for i in range(STEPS):
        state, metrics = step(state, batch, jax.random.key(i))
        history.append(jax.device_get(metrics))
    return state, history


def _jit(model, batch, mesh, objective=FlowMatching(), optimizer=OPTIMIZER, extra=None, **kw):
    return _train(*make_train_step(objective, optimizer, mesh, model=model, **kw), model, batch, extra)


def _assert_close(got, ref, tol=1e-5):
    """max|got - ref| <= tol * max(1, max|ref|), leaf by leaf."""
    for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got), strict=True):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        err = np.abs(g - r).max()
        assert err <= tol * max(1.0, np.abs(r).max()), (jax.tree_util.keystr(path), err)


def _assert_same_run(got, ref):
    (state, history), (ref_state, ref_history) = got, ref
    for name in ("loss", "grad_norm", "t"):
        _assert_close([h[name] for h in history], [h[name] for h in ref_history])
    _assert_close(jax.device_get(state.params), jax.device_get(ref_state.params))
    assert int(state.step) == STEPS


@pytest.fixture(scope="module")
def one_device(model, batch):
    return _jit(model, batch, make_mesh(devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def one_device_batch_noise(model, batch):
    return _jit(model, batch, make_mesh(devices=jax.devices()[:1]), FlowMatching(noise_from_key=False))


@pytest.mark.parametrize("rules, sizes", [
    ("dp", dict(data=8)),
    ("fsdp", dict(data=1, fsdp=8)),
    ("fsdp_tp", dict(data=2, fsdp=2, tensor=2)),
])
def test_meshes_agree_with_one_device(model, batch, one_device, rules, sizes):
    got = _jit(model, batch, make_mesh(**sizes), rules=rules)
    _assert_same_run(got, one_device)
    state, history = got
    assert history[-1]["loss"] < history[0]["loss"]
    replicated = sum(x.nbytes for x in jax.tree.leaves(jax.device_get((state.params, state.opt_state))))
    per_device = _per_device_bytes((state.params, state.opt_state))
    if rules == "dp":
        assert per_device == replicated
    elif rules == "fsdp":  # ZeRO-3: params and momentum split 8 ways (tiny norm scales replicated)
        assert per_device <= 0.2 * replicated, (per_device, replicated)
    else:
        q = state.params["transformer_blocks"][0]["attn"]["to_q"]["kernel"].get_value()
        assert q.sharding.spec == PartitionSpec("fsdp", "tensor")


def test_micro_batches_equal_full_batch(model, batch, one_device_batch_noise):
    got = _jit(model, batch, make_mesh(data=2, fsdp=4), FlowMatching(noise_from_key=False),
               micro_batches=2, remat=True)
    _assert_same_run(got, one_device_batch_noise)


def test_pmap_equals_jit(model, batch, one_device_batch_noise):
    init, step = pmap_step(FlowMatching(noise_from_key=False), OPTIMIZER, model=model)
    state, history = _train(init, step, model, batch)
    assert jax.tree.leaves(state.params)[0].shape[0] == 8  # one replica per device
    first = state.replace(step=state.step[0], params=jax.tree.map(lambda x: x[0], state.params))
    _assert_same_run((first, history), one_device_batch_noise)


def test_lora_trains_only_adapters_and_frozen_arrays_survive(batch):
    lora_model = random_model(CONFIG, 1)
    base_graphdef, base_state = nnx.split(lora_model)
    add_lora(lora_model, [r"attn\.to_[qv]", r"ff\.net\.2"], rank=4, rngs=nnx.Rngs(2))
    nnx.update(lora_model, jax.device_get(nnx.state(lora_model, nnx.LoRAParam)))
    before = dict(nnx.to_flat_state(jax.device_get(nnx.state(lora_model))))
    lr, clip = 0.5, 1e-3
    state, history = _jit(lora_model, batch, make_mesh(data=2, fsdp=4),
                          LoRAFlowMatching(noise_from_key=False, base=base_graphdef), optax.sgd(lr),
                          trainable="lora", rules="fsdp", clip_norm=clip, extra=base_state)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    assert {type(v) for v in jax.tree.leaves(state.params, is_leaf=is_var)} == {nnx.LoRAParam}
    # Base weights and the extra model: bit-identical and still alive (never donated).
    for path, var in nnx.to_flat_state(state.frozen.rest):
        np.testing.assert_array_equal(var.get_value(), before[path].get_value())
    extra = dict(nnx.to_flat_state(base_state))
    for path, var in nnx.to_flat_state(state.frozen.extra):
        np.testing.assert_array_equal(var.get_value(), extra[path].get_value())
    assert all(h["reference_gap"] <= 1e-6 for h in history)  # zero adapters = the base model
    # Adapters moved (B starts at zero), at most lr * clip_norm per step (the gradient is larger).
    moved = {path: np.asarray(var.get_value()) - before[path].get_value()
             for path, var in nnx.to_flat_state(state.params)}
    assert all(np.abs(d).max() > 0 for path, d in moved.items() if path[-1] == "lora_b")
    assert all(h["grad_norm"] > clip for h in history)
    assert np.sqrt(sum((d**2).sum() for d in moved.values())) <= STEPS * lr * clip * (1 + 1e-4)
    assert history[-1]["loss"] < history[0]["loss"]


def test_donated_state_leaves_the_models_arrays_alive(batch):
    """The step donates its state; the params ``init_state`` took from the model are copies, so
    the model (on device, replicated onto an 8-device mesh) stays usable after training."""
    model = random_model(CONFIG, 3)
    nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))  # device arrays, as trained models hold
    params = nnx.state(model, nnx.Param)
    state, _ = _jit(model, batch, make_mesh(data=8))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_bf16_compute_keeps_fp32_master_params(model, batch, one_device):
    state, history = _jit(model, batch, make_mesh(devices=jax.devices()[:1]), compute_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} == {jnp.dtype(jnp.float32)}
    ref = one_device[1][0]
    np.testing.assert_allclose(history[0]["loss"], ref["loss"], rtol=1e-2)
    np.testing.assert_allclose(history[0]["grad_norm"], ref["grad_norm"], rtol=2e-2)
    assert abs(history[0]["grad_norm"] / ref["grad_norm"] - 1) > 1e-4  # it did compute in bf16


def test_bad_inputs(model, batch):
    init, step = make_train_step(FlowMatching(), OPTIMIZER, make_mesh(), model=model, micro_batches=2)
    short = {k: v[:8] for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"batch size 8 is not divisible by 16 \(micro_batches=2 x 8 batch"):
        step(None, short, jax.random.key(0))
    with pytest.raises(ValueError, match="same leading"):
        step(None, {**batch, "ids": np.zeros((4, 3))}, jax.random.key(0))
    with pytest.raises(ValueError, match="trainable='lora' selects no parameter.*add_lora"):
        make_train_step(FlowMatching(), OPTIMIZER, make_mesh(), model=model, trainable="lora")
    with pytest.raises(ValueError, match="micro_batches=0 must be >= 1"):
        make_train_step(FlowMatching(), OPTIMIZER, make_mesh(), model=model, micro_batches=0)
    with pytest.raises(ValueError, match="structure differs"):
        init(random_model(dataclasses.replace(CONFIG, num_layers=2), 0))
    _, pstep = pmap_step(FlowMatching(), OPTIMIZER, model=model)
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by 8 \(8 devices"):
        pstep(None, {k: v[:12] for k, v in batch.items()}, jax.random.key(0))
