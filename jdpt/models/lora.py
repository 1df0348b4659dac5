"""LoRA: low-rank adapters on chosen linear layers, chosen by name pattern.

``add_lora(model, r"attn\\.to_[qkv]", rank=16)`` wraps every ``nnx.Linear`` whose reference module
path (``transformer_blocks.0.attn.to_q``) ends with a match of the pattern in a
:class:`LoRALinear`: ``y = base(x) + (alpha / rank) * x A B`` with ``A [in, rank]`` random and
``B [rank, out]`` zero, so the model's output is unchanged at insertion. Adapters are
``nnx.LoRAParam``: ``nnx.split(model, nnx.LoRAParam, ...)`` trains them alone, and the base
weights are shared, not copied.

Adapters save and load in the PEFT/diffusers safetensors format with
:func:`jdpt.weights.lora.save_lora` / :func:`jdpt.weights.lora.load_lora`.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.models.keys import torch_key_map


class LoRALinear(nnx.Module):
    """A linear layer plus a low-rank update; parameter-compatible with its base layer."""

    torch_names = {"base": ""}  # the base weights keep their reference keys

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}")
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.merged = False
        kernel = base.kernel
        in_axis, out_axis = (kernel.get_metadata().get("out_sharding") or (None, None))
        n_in, n_out = kernel.shape
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
        bound = 1.0 / np.sqrt(n_in)
        a = jax.random.uniform(rngs.params(), (n_in, rank), kernel.dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=(in_axis, None), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, n_out), kernel.dtype),
                                    out_sharding=(None, out_axis), eager_sharding=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> jax.Array:
        """The dense update ``scale * A B`` ``[in, out]`` (fp32)."""
        a = self.lora_a.get_value().astype(jnp.float32)
        b = self.lora_b.get_value().astype(jnp.float32)
        return self.scale * (a @ b)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if self.merged:
            return y
        a, b = self.lora_a.get_value(), self.lora_b.get_value()
        return y + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


def _linear_paths(model: nnx.Module) -> dict[str, tuple]:
    """Reference module path (``transformer_blocks.0.attn.to_q``) -> graph path of each linear
    layer (of the :class:`LoRALinear` when wrapped)."""
    out = {}
    for key, slot in torch_key_map(model).items():
        if slot.layout == "linear":
            path = slot.path[:-1]
            if path and path[-1] == "base":
                path = path[:-1]
            out[key.removesuffix(".weight")] = path
    return out


def _get(model: nnx.Module, path: tuple):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set(model: nnx.Module, path: tuple, value) -> None:
    parent = _get(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT's target rule: a pattern matches a dotted suffix of the module path."""
    return any(re.fullmatch(rf"(?:.*\.)?(?:{p})", name) for p in patterns)


def add_lora(model: nnx.Module, targets: str | Sequence[str], *, rank: int, alpha: float | None = None,
             rngs: nnx.Rngs | None = None) -> list[str]:
    """Wrap every linear layer whose module path ends with a match of ``targets`` in LoRA.

    Args:
        model: a jdpt model (modified in place).
        targets: regex(es) matched against dotted suffixes of reference module paths, e.g.
            ``r"attn\\.to_[qkv]"`` or ``[r"to_q", r"to_k", r"to_v", r"to_out\\.0"]``.
        rank: adapter rank; ``alpha`` defaults to ``rank`` (scale 1, the diffusers default).
        rngs: randomness for ``A``; default ``nnx.Rngs(0)``.

    Returns:
        The wrapped module paths, in order. Raises if none match.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    rngs = rngs or nnx.Rngs(0)
    paths = _linear_paths(model)
    chosen = [name for name in paths if _matches(name, patterns)]
    if not chosen:
        raise ValueError(
            f"LoRA targets {patterns} match no linear layer; examples of layer names: "
            f"{list(paths)[:8]}"
        )
    for name in chosen:
        node = _get(model, paths[name])
        if isinstance(node, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        _set(model, paths[name], LoRALinear(node, rank, rank if alpha is None else alpha, rngs=rngs))
    return chosen


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """Reference module path -> :class:`LoRALinear` for every adapter in ``model``."""
    return {name: node for name, path in _linear_paths(model).items()
            if isinstance(node := _get(model, path), LoRALinear)}


def has_unmerged_lora(model: nnx.Module) -> bool:
    return any(not layer.merged for layer in lora_layers(model).values())


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (``W += scale A B``); forward then skips the
    adapter. :func:`unmerge_lora` undoes it. Modifies ``model`` in place and returns it."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            k = layer.base.kernel
            k.set_value((k.get_value().astype(jnp.float32) + layer.delta()).astype(k.dtype))
            layer.merged = True
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Subtract merged adapters from their base kernels again (exact up to rounding)."""
    for layer in lora_layers(model).values():
        if layer.merged:
            k = layer.base.kernel
            k.set_value((k.get_value().astype(jnp.float32) - layer.delta()).astype(k.dtype))
            layer.merged = False
    return model


def lora_config(model: nnx.Module) -> dict:
    """The PEFT ``LoraConfig`` fields describing ``model``'s adapters (most common rank/alpha,
    exceptions in ``rank_pattern``/``alpha_pattern``)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters; add them with add_lora")
    r = collections.Counter(l.rank for l in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(l.alpha for l in layers.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: l.rank for n, l in layers.items() if l.rank != r},
        "alpha_pattern": {n: l.alpha for n, l in layers.items() if l.alpha != alpha},
        "target_modules": sorted(layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
    }


def linear_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Reference module path -> every linear layer of ``model`` (its :class:`LoRALinear` where
    it has an adapter)."""
    return {name: _get(model, path) for name, path in _linear_paths(model).items()}


def attach_lora(model: nnx.Module, name: str, a: jax.Array, b: jax.Array, alpha: float) -> None:
    """Give the linear layer at reference path ``name`` an adapter with weights ``a [in, rank]``
    and ``b [rank, out]`` (in place; the loader of saved adapters).

    Raises:
        ValueError: no such layer, it already has an adapter, or the shapes do not fit it.
    """
    paths = _linear_paths(model)
    if name not in paths:
        raise ValueError(f"{type(model).__name__} has no linear layer {name!r}")
    base = _get(model, paths[name])
    if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already has a LoRA adapter")
    n_in, n_out = base.kernel.shape
    rank = a.shape[-1]
    if a.shape != (n_in, rank) or b.shape != (rank, n_out):
        raise ValueError(f"{name}: adapter A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a "
                         f"[{n_in} -> {n_out}] layer")
    layer = LoRALinear(base, rank, alpha, rngs=nnx.Rngs(0))
    layer.lora_a.set_value(jnp.asarray(a, base.kernel.dtype))
    layer.lora_b.set_value(jnp.asarray(b, base.kernel.dtype))
    _set(model, paths[name], layer)
