"""HeadHunter (arXiv 2506.10978, "Fine-Grained Perturbation Guidance via Attention Head
Selection"): greedy search for the set of attention heads whose joint SoftPAG perturbation
maximises a user objective over a prompt set.

The search is model-agnostic: it scores candidate head sets through ``reward(head_weights)``,
where ``head_weights`` is ``{layer name: u [H]}`` with ``u = 1`` on the selected heads (the
:class:`jdpt.guidance.perturbation.SoftPAG` argument). On the Shapes world the reward is the
verifier's mean score of images sampled with that guidance over a fixed prompt set and fixed
noise; tests use a toy reward. The paper's selection hyper-parameters are unverified (no
official code found); the defaults here are a small budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Head = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class HeadSearchConfig:
    """Greedy head selection (HeadHunter, arXiv 2506.10978).

    Attributes:
        max_heads: stop once this many heads are selected.
        budget: at most this many reward evaluations in all (the empty set's included).
        min_gain: add a head only if it raises the reward by more than this.
    """

    max_heads: int = 4
    budget: int = 64
    min_gain: float = 0.0

    def __post_init__(self):
        if self.max_heads < 1 or self.budget < 2:
            raise ValueError(f"HeadSearchConfig needs max_heads >= 1 and budget >= 2; got {self}")


@dataclasses.dataclass(frozen=True)
class HeadSearchResult:
    """selected: heads in the order they were added; rewards: the reward after each addition,
    ``rewards[0]`` the empty set's; evaluations: reward calls spent."""

    selected: list[Head]
    rewards: list[float]
    evaluations: int
    heads: Mapping[str, int]

    def head_weights(self) -> dict[str, np.ndarray]:
        """``{layer: u [H]}``: 1 on the selected heads (only layers with a selected head)."""
        return weights_for(self.selected, self.heads)


def weights_for(selected: Sequence[Head], heads: Mapping[str, int]) -> dict[str, np.ndarray]:
    """SoftPAG weights ``{layer: u [H] fp32}`` with ``u = 1`` on ``selected`` heads."""
    out: dict[str, np.ndarray] = {}
    for layer, head in selected:
        if layer not in heads or not 0 <= head < heads[layer]:
            raise ValueError(f"head {(layer, head)} is not a head of the candidate layers {dict(heads)}")
        out.setdefault(layer, np.zeros(heads[layer], np.float32))[head] = 1.0
    return out


def head_hunter(reward: Callable[[dict[str, np.ndarray]], float], heads: Mapping[str, int],
                config: HeadSearchConfig = HeadSearchConfig()) -> HeadSearchResult:
    """Greedily grow a head set maximising ``reward``.

    Each round scores every unselected candidate head added to the current set and keeps the
    best if it gains more than ``min_gain``; the search stops at ``max_heads`` heads, when no
    head gains, or when the evaluation budget runs out (a round cut short by the budget still
    keeps its best head so far).

    Args:
        reward: ``{layer: u [H]} -> float`` (higher is better), e.g. the verifier's mean score
            of a fixed prompt set sampled with ``SoftPAG(head_weights)``.
        heads: candidate layers and their head counts, ``{layer name: H}``.
        config: :class:`HeadSearchConfig`.
    """
    if not heads:
        raise ValueError("head_hunter needs at least one candidate layer: heads={layer name: head count}")
    candidates = [(layer, h) for layer, n in heads.items() for h in range(n)]
    selected: list[Head] = []
    best = float(reward({}))
    rewards, evaluations = [best], 1
    while len(selected) < config.max_heads and evaluations < config.budget:
        round_best, round_head = -np.inf, None
        for head in candidates:
            if head in selected:
                continue
            if evaluations >= config.budget:
                break
            value = float(reward(weights_for([*selected, head], heads)))
            evaluations += 1
            if not np.isfinite(value):
                raise ValueError(f"reward returned {value} for heads {[*selected, head]}; it must be finite")
            if value > round_best:
                round_best, round_head = value, head
        if round_head is None or round_best - best <= config.min_gain:
            break
        selected.append(round_head)
        best = round_best
        rewards.append(best)
    return HeadSearchResult(selected, rewards, evaluations, dict(heads))
