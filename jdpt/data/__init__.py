"""Data: preference pairs from scored samples, tensorflow-datasets builders of real data sets
(:mod:`jdpt.data.builders`) and grain loading (:mod:`jdpt.data.loading`). The Shapes world's
scenes, grammar and builders live in :mod:`jdpt.world`."""

from jdpt.data.preference import PreferencePairs, preference_pairs
from jdpt.data.rng import as_rng

__all__ = ["PreferencePairs", "as_rng", "preference_pairs"]
