"""The Shapes world's training data as checkpointable grain streams (:func:`jdpt.data.loading.make_stream`).

Batch ``i`` of every stream is a deterministic function of ``(seed, i)``, so ``jdpt.train.fit``
resumes a run with exactly the batches it would have seen:

- :class:`SceneBatches`: rendered (prompt, scene) pairs as ``{"x0", "cond": {"input_ids"}}``
  for pretraining, a share of prompts replaced by the empty prompt (classifier-free guidance);
- :class:`PromptBatches`: grammar prompts as ``{"cond": {"input_ids"}, "prompt"}`` for the
  online methods' rollouts;
- :class:`NoiseBatches`: prompts with their initial noise and reward targets for reward backprop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import numpy as np

from jdpt.data.loading import make_stream
from jdpt.world.model import WorldConfig, empty_prompt
from jdpt.world.scenes import PROMPT_TOKENS, ShapesConfig, sample_pairs, sample_prompts, tokenize


def _rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i])


@dataclasses.dataclass(frozen=True)
class SceneBatches:
    """Batch ``i``: ``batch_size`` random prompts and scenes satisfying them, the scenes as the
    clean latents of ``world`` (``world.latents``), a share ``uncond_prob`` of the prompts
    replaced by the empty prompt."""

    world: WorldConfig
    batch_size: int
    seed: int
    uncond_prob: float = 0.0

    def __call__(self, i: int) -> dict:
        rng = _rng(self.seed, i)
        prompts, images = sample_pairs(rng, self.batch_size, self.world.shapes)
        ids = tokenize([p.text for p in prompts], self.world.shapes, PROMPT_TOKENS)
        ids[rng.random(len(ids)) < self.uncond_prob] = empty_prompt()
        return {"x0": np.asarray(self.world.latents(images), np.float32), "cond": {"input_ids": ids}}


@dataclasses.dataclass(frozen=True)
class PromptBatches:
    """Batch ``i``: ``batch_size`` fresh grammar prompts (token ids and texts)."""

    shapes: ShapesConfig
    batch_size: int
    seed: int

    def prompts(self, i: int):
        return sample_prompts(_rng(self.seed, i), self.batch_size, self.shapes)

    def __call__(self, i: int) -> dict:
        prompts = self.prompts(i)
        texts = [p.text for p in prompts]
        return {"cond": {"input_ids": tokenize(texts, self.shapes, PROMPT_TOKENS)}, "prompt": np.asarray(texts)}


@dataclasses.dataclass(frozen=True)
class NoiseBatches:
    """Batch ``i``: :class:`PromptBatches`' prompts, each with its initial noise ``[N, C]`` and
    the per-prompt reward inputs ``targets(prompts) -> dict of [B, ...]`` added to ``cond``."""

    prompts: PromptBatches
    latent_shape: tuple[int, ...]
    targets: Callable

    def __call__(self, i: int) -> dict:
        batch = self.prompts(i)
        noise = _rng(self.prompts.seed + 1, i).standard_normal((self.prompts.batch_size, *self.latent_shape))
        cond = {**batch["cond"], **self.targets(self.prompts.prompts(i))}
        return {"noise": noise.astype(np.float32), "cond": cond}


def stream(make_batch, num_batches: int = 10**9, *, threads: int = 4) -> grain.DataLoader:
    """``make_stream`` of one of the batch makers above (default: practically endless)."""
    return make_stream(make_batch, num_batches,
                       read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
