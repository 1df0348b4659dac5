"""Reference (PyTorch) state-dict keys of a jdpt module, derived from its module tree.

jdpt modules mirror the reference module tree: an attribute ``to_q`` holding an ``nnx.Linear``
inside ``transformer_blocks[3].attn`` is the PyTorch key ``transformer_blocks.3.attn.to_q.weight``.
The key of every parameter is therefore *derived* from the module tree, not listed by hand:

- ``nnx.Linear``: ``kernel [in, out]`` <-> ``weight [out, in]``; ``bias`` <-> ``bias``.
- ``nnx.Conv``: ``kernel [kh, kw, in, out]`` <-> ``weight [out, in, kh, kw]``.
- ``nnx.Embed``: ``embedding`` <-> ``weight``.
- ``nnx.LayerNorm`` / ``nnx.GroupNorm`` / ``nnx.RMSNorm``: ``scale`` <-> ``weight``.
- any other ``nnx.Param``: same name, same layout.

A module whose attribute names differ from the reference declares ``torch_names`` (attribute ->
dotted reference path, ``""`` to splice the child's keys into its own). ``nnx.LoRAParam``
adapters are not part of a base model's state dict (see ``jdpt.models.lora``). Reading and
writing the files is :mod:`jdpt.weights.diffusers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flax import nnx


@dataclass(frozen=True)
class Slot:
    """Where one reference tensor lives in the NNX state, and how its layout differs."""

    path: tuple  # path into nnx.state(model)
    layout: str  # "linear" | "conv" | "same"


def to_ours(arr: np.ndarray, layout: str) -> np.ndarray:
    """A reference (PyTorch) tensor in jdpt's layout (``Slot.layout``)."""
    if layout == "linear":
        return arr.T
    if layout == "conv":
        return arr.transpose(2, 3, 1, 0)
    return arr


def to_torch(arr: np.ndarray, layout: str) -> np.ndarray:
    """A jdpt array in the reference (PyTorch) layout (``Slot.layout``)."""
    if layout == "linear":
        return arr.T
    if layout == "conv":
        return arr.transpose(3, 2, 0, 1)
    return arr


_LEAF_RULES: tuple[tuple[type, dict[str, tuple[str, str]]], ...] = (
    (nnx.Linear, {"kernel": ("weight", "linear"), "bias": ("bias", "same")}),
    (nnx.Conv, {"kernel": ("weight", "conv"), "bias": ("bias", "same")}),
    (nnx.Embed, {"embedding": ("weight", "same")}),
    (nnx.LayerNorm, {"scale": ("weight", "same"), "bias": ("bias", "same")}),
    (nnx.GroupNorm, {"scale": ("weight", "same"), "bias": ("bias", "same")}),
    (nnx.RMSNorm, {"scale": ("weight", "same")}),
)


def torch_key_map(model: nnx.Module) -> dict[str, Slot]:
    """Every reference state-dict key of ``model`` (LoRA adapters excluded) -> its :class:`Slot`."""
    nodes = dict(nnx.iter_graph(model))
    out: dict[str, Slot] = {}
    for path, node in nodes.items():
        if not isinstance(node, nnx.Param) or isinstance(node, nnx.LoRAParam):
            continue
        parent = nodes[path[:-1]]
        leaf = path[-1]
        name, layout = leaf, "same"
        for cls, rules in _LEAF_RULES:
            if isinstance(parent, cls):
                if leaf not in rules:
                    raise TypeError(f"no reference name for {cls.__name__}.{leaf} at {path}")
                name, layout = rules[leaf]
                break
        else:
            name = getattr(parent, "torch_names", {}).get(leaf, leaf)
        parts = []
        for i, key in enumerate(path[:-1]):
            owner = nodes[path[:i]]
            parts.append(getattr(owner, "torch_names", {}).get(key, str(key)))
        parts.append(name)
        key = ".".join(p for p in parts if p != "")
        if key in out:
            raise TypeError(f"two parameters map to the reference key {key!r}: {out[key].path}, {path}")
        out[key] = Slot(path, layout)
    return out
