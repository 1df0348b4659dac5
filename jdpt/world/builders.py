"""tensorflow-datasets builders of the Shapes world: rendered prompt/scene pairs and
verifier-made preference pairs in the Pick-a-Pic layout (:mod:`jdpt.data.builders` says how the
builders are written and read without TensorFlow). They need no files: a config (world, count,
seed) decides every example.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jdpt.data.builders import LocalBuilder
from jdpt.data.preference import preference_pairs
from jdpt.world.scenes import ShapesConfig, render, sample_pairs, sample_prompts
from jdpt.world.verifier import verify


@dataclasses.dataclass(eq=False)
class ShapesPairsConfig(tfds.core.BuilderConfig):
    """``num_examples`` pairs ``jdpt.world.scenes.sample_pairs(seed, num_examples, world)``.

    A config's ``name`` names its folder: give each distinct setting its own name.
    """

    num_examples: int = 4096
    seed: int = 0
    world: ShapesConfig = ShapesConfig()


class ShapesPairs(LocalBuilder):
    """Shapes-world prompts with scenes satisfying them (:func:`jdpt.world.scenes.sample_pairs`).

    Features: ``prompt``, ``category`` (text), ``image`` (uint8 ``[S, S, 3]``), in sampling order.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sample_pairs(seed, num_examples, world) as one train split."}
    BUILDER_CONFIGS = [ShapesPairsConfig(name="default", description="4096 pairs, seed 0, default world")]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.world.image_size
        return self._local_info(
            "Shapes-world prompt/image pairs rendered from a seed.",
            {"prompt": tfds.features.Text(), "category": tfds.features.Text(),
             "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png")})

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        prompts, images = sample_pairs(config.seed, config.num_examples, config.world)
        for key, (prompt, image) in enumerate(zip(prompts, images)):
            yield key, {"prompt": prompt.text, "category": prompt.category, "image": Image.fromarray(image)}


@dataclasses.dataclass(eq=False)
class ShapesPreferencesConfig(tfds.core.BuilderConfig):
    """Verifier-made preference pairs in the Pick-a-Pic layout.

    For each of ``num_prompts`` prompts (``sample_prompts(rng, num_prompts, world)`` with
    ``rng = np.random.default_rng(seed)``), ``samples_per_prompt`` candidates: the first half
    rendered for the prompt, the others for distractor prompts drawn next from ``rng`` (one per
    candidate), all rendered by one ``render(targets, rng, world)`` call. The verifier scores
    them (0/1) and :func:`jdpt.data.preference_pairs` (seeded with ``rng``) pairs winners with
    losers, at most ``max_pairs_per_prompt`` per prompt (None: all). A fair coin from ``rng``
    then decides which of the pair is ``image_0``.
    """

    num_prompts: int = 2048
    samples_per_prompt: int = 4
    max_pairs_per_prompt: int | None = 1
    seed: int = 0
    world: ShapesConfig = ShapesConfig()

    def __post_init__(self):
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: a pair needs at least "
                             "2 candidates per prompt; pass samples_per_prompt >= 2")


class ShapesPreferences(LocalBuilder):
    """Shapes-world preference pairs read like :class:`PickAPicPreferences`.

    Features: ``caption``, ``category`` (text), ``image_0`` / ``image_1`` (uint8 ``[S, S, 3]``),
    ``label_0`` / ``label_1`` (float32, 1 marks the verifier's winner; never tied).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Verifier-scored renders vs distractor renders, Pick-a-Pic layout."}
    BUILDER_CONFIGS = [ShapesPreferencesConfig(name="default",
                                               description="2048 prompts x 4 candidates, seed 0")]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.world.image_size
        image = tfds.features.Image(shape=(size, size, 3), encoding_format="png")
        return self._local_info(
            "Shapes-world preference pairs made by the GenEval-lite verifier.",
            {"caption": tfds.features.Text(), "category": tfds.features.Text(), "image_0": image,
             "image_1": image, "label_0": np.float32, "label_1": np.float32})

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        world, n, k = config.world, config.num_prompts, config.samples_per_prompt
        rng = np.random.default_rng(config.seed)
        prompts = sample_prompts(rng, n, world)
        distractors = iter(sample_prompts(rng, n * (k - k // 2), world))
        targets = [p if j < k // 2 else next(distractors) for p in prompts for j in range(k)]
        images = render(targets, rng, world)  # [n * k, S, S, 3]
        scores = verify(images, [p for p in prompts for _ in range(k)], world).score.reshape(n, k)
        pairs = preference_pairs(scores, rng, max_pairs_per_prompt=config.max_pairs_per_prompt)
        winners, losers = pairs.take(images.reshape(n, k, *images.shape[1:]))
        flip = rng.random(len(pairs)) < 0.5
        for key in range(len(pairs)):
            prompt = prompts[pairs.prompt[key]]
            first, second = (losers[key], winners[key]) if flip[key] else (winners[key], losers[key])
            yield key, {"caption": prompt.text, "category": prompt.category,
                        "image_0": Image.fromarray(first), "image_1": Image.fromarray(second),
                        "label_0": float(not flip[key]), "label_1": float(flip[key])}
