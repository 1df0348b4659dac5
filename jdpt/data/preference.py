"""Preference pairs from scored samples: the (winner, loser) data of Diffusion-DPO and MaPO.

Given ``K`` images per prompt and their scores (e.g. the Shapes verifier's 0/1 GenEval-lite
score), every pair of images of a prompt whose scores differ is a candidate pair, the higher score
winning. An optional tie-break reward orders images whose scores are equal; pairs equal on both
are skipped. Optionally at most ``max_pairs_per_prompt`` candidates per prompt are kept, chosen at
random (deterministic given the seed).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jdpt.data.rng import as_rng


@dataclasses.dataclass(frozen=True)
class PreferencePairs:
    """Indices of ``N`` preference pairs into a ``[P, K, ...]`` batch of images.

    Attributes:
        prompt: int32 ``[N]`` prompt index in ``[0, P)``, ascending.
        winner: int32 ``[N]`` index in ``[0, K)`` of the preferred image.
        loser: int32 ``[N]`` index in ``[0, K)`` of the other image.
    """

    prompt: np.ndarray
    winner: np.ndarray
    loser: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    def take(self, images) -> tuple[np.ndarray, np.ndarray]:
        """``(winners, losers)``, each ``[N, ...]``, gathered from ``images [P, K, ...]``."""
        images = np.asarray(images)
        return images[self.prompt, self.winner], images[self.prompt, self.loser]


def preference_pairs(scores, seed, *, tie_break=None,
                     max_pairs_per_prompt: int | None = None) -> PreferencePairs:
    """(winner, loser) pairs among the ``K`` samples of each prompt.

    Args:
        scores: ``[P, K]`` primary scores (higher is better).
        seed: int, numpy Generator or JAX key; used only to choose among candidates when
            ``max_pairs_per_prompt`` is set.
        tie_break: optional ``[P, K]`` secondary reward comparing samples with equal scores.
        max_pairs_per_prompt: keep at most this many random pairs per prompt; None keeps all.

    Returns:
        :class:`PreferencePairs`, ordered by prompt, then by sample indices when all are kept.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [P, K] (K samples per prompt); got shape {scores.shape}. "
                         "Reshape flat scores with scores.reshape(P, K)")
    secondary = np.zeros_like(scores) if tie_break is None else np.asarray(tie_break, np.float64)
    if secondary.shape != scores.shape:
        raise ValueError(f"tie_break has shape {secondary.shape} but scores {scores.shape}; pass "
                         "one tie-break value per sample")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt={max_pairs_per_prompt}: pass a count >= 1, or "
                         "None to keep every pair")
    num_prompts, k = scores.shape
    i, j = np.triu_indices(k, 1)  # [C] candidate pairs i < j
    order = np.sign(scores[:, i] - scores[:, j])
    order = np.where(order == 0, np.sign(secondary[:, i] - secondary[:, j]), order)  # [P, C]
    valid = order != 0
    if max_pairs_per_prompt is not None:
        keys = np.where(valid, as_rng(seed).random(valid.shape), np.inf)
        rank = np.argsort(np.argsort(keys, axis=1), axis=1)
        valid &= rank < max_pairs_per_prompt
    prompt, c = np.nonzero(valid)
    first_wins = order[prompt, c] > 0
    winner = np.where(first_wins, i[c], j[c])
    loser = np.where(first_wins, j[c], i[c])
    return PreferencePairs(prompt.astype(np.int32), winner.astype(np.int32), loser.astype(np.int32))
