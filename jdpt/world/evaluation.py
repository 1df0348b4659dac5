"""Sampling and scoring the Shapes-world models: one sampler, one evaluation.

:func:`evaluate` samples one image per prompt and scores them with the verifier (GenEval-lite);
pretraining, post-training (before / after, probes, the offline data), the CLI demo and the
experiment scripts all go through it. The sampler is one jitted function of the model's state
(its graph static), so every model of one architecture and batch shape, a post-trained copy with
LoRA adapters included, reuses one compiled program.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS, WorldConfig
from jdpt.world.scenes import CATEGORIES, Prompt, sample_prompts
from jdpt.world.verifier import Verdict, verify


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "cfg_scale"))
def _sample(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, key: jax.Array, guidance, *,
            steps: int, cfg_scale: float) -> jax.Array:
    extra = {} if guidance is None else {"guidance": guidance}  # models without guidance= (UNet world)
    return nnx.merge(graphdef, state).generate(ids, key, steps=steps, cfg_scale=cfg_scale, **extra)


def make_sampler(model: nnx.Module, *, steps: int = SAMPLING_STEPS, cfg_scale: float = CFG_SCALE, guidance=None):
    """``sample(input_ids [B, L], key, guidance=guidance) -> uint8 [B, H, W, 3]`` of ``model``.

    ``guidance``: a ``jdpt.guidance`` method replacing ``cfg_scale`` (see
    :meth:`jdpt.world.model.WorldModel.generate`). It is a traced argument: another one of the same
    structure (other scales, other SoftPAG head weights) reuses the compiled function.
    """
    graphdef, state = nnx.split(model)

    def sample(input_ids, key, guidance=guidance):
        return _sample(graphdef, state, input_ids, key, guidance, steps=steps, cfg_scale=cfg_scale)

    return sample


def eval_prompts(n_per_category: int, world: WorldConfig, seed: int = 2024) -> list[Prompt]:
    """A fixed prompt set: ``n_per_category`` prompts of each GenEval category, category-major."""
    rng = np.random.default_rng(seed)
    return [p for c in CATEGORIES for p in sample_prompts(rng, n_per_category, world.shapes, categories=[c])]


def evaluate(model: nnx.Module, prompts: list[Prompt], *, seed: int = 0, steps: int = SAMPLING_STEPS,
             cfg_scale: float = CFG_SCALE, batch_size: int = 64, strict: bool = False,
             progress: bool = True) -> tuple[np.ndarray, Verdict]:
    """Sample one image per prompt and score it with the verifier (GenEval-lite).

    Chunk ``i`` (prompts ``[i, i + batch_size)``) samples with ``fold_in(key(seed), i)``; the last
    chunk is padded to ``batch_size`` so that every chunk runs one compiled program.

    Returns:
        uint8 images ``[len(prompts), H, W, 3]`` and the :class:`Verdict` (``strict``: extra
        objects fail, :func:`jdpt.world.verifier.verify`).
    """
    if not prompts:
        raise ValueError("evaluate needs at least one prompt; got an empty list")
    sample = make_sampler(model, steps=steps, cfg_scale=cfg_scale)
    key = jax.random.key(seed)
    chunks = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sample", unit="batch", disable=not progress):
        chunk = prompts[i:i + batch_size]
        ids = model.tokenize([p.text for p in chunk])
        ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - len(ids), axis=0)])
        chunks.append(np.asarray(sample(ids, jax.random.fold_in(key, i)))[: len(chunk)])
    images = np.concatenate(chunks)
    return images, verify(images, prompts, model.config.shapes, strict=strict)
