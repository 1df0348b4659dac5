"""LoRA adapters on disk: the PEFT/diffusers safetensors format.

``{prefix}.{module}.lora_A.weight [rank, in]`` and ``lora_B.weight [out, rank]``, the LoRA config
in the ``lora_adapter_metadata`` header, so ``FluxPipeline.load_lora_weights`` reads a LoRA trained
here and :func:`load_lora` reads one trained with diffusers/PEFT. The adapters themselves are
:mod:`jdpt.models.lora`.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from jdpt.models.lora import LoRALinear, attach_lora, linear_layers, lora_config, lora_layers
from jdpt.weights.files import WeightsError, write_tensors

METADATA_KEY = "lora_adapter_metadata"  # the safetensors header key diffusers reads


def save_lora(model: nnx.Module, path: str | Path, *, prefix: str = "transformer") -> Path:
    """Write the adapters as one PEFT/diffusers safetensors file.

    ``prefix`` is the pipeline component (``"transformer"``, ``"unet"``, ``"text_encoder"``);
    a folder ``path`` gets diffusers' file name ``pytorch_lora_weights.safetensors``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    tensors = {}
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise ValueError(f"{name}: the adapter is merged; call unmerge_lora before save_lora")
        tensors[f"{prefix}.{name}.lora_A.weight"] = np.asarray(jax.device_get(layer.lora_a.get_value())).T
        tensors[f"{prefix}.{name}.lora_B.weight"] = np.asarray(jax.device_get(layer.lora_b.get_value())).T
    meta = {f"{prefix}.{k}": v for k, v in lora_config(model).items()}
    write_tensors(tensors, path.parent, path.stem, max_shard_bytes=2**62,
                  metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def load_lora(model: nnx.Module, path: str | Path, *, prefix: str = "transformer") -> list[str]:
    """Add the adapters stored at ``path`` (PEFT/diffusers safetensors) to ``model`` in place.

    Keys ``{prefix}.{module}.lora_A.weight`` / ``lora_B.weight`` are read; alpha comes from the
    ``lora_adapter_metadata`` header when present, else alpha = rank (the diffusers convention).
    Returns the module paths that got adapters.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise WeightsError(f"no LoRA file at {str(path)!r}")
    with safe_open(path, framework="numpy") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    meta = {k.removeprefix(f"{prefix}."): v for k, v in meta.items() if k.startswith(f"{prefix}.")}

    pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    other = []
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(prefix)}\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m:
            pairs[m.group(1)][m.group(2)] = value
        elif key.startswith(f"{prefix}."):
            other.append(key)
    if other:
        raise WeightsError(f"{path}: keys that are not LoRA A/B weights: {sorted(other)[:10]}")
    if not pairs:
        raise WeightsError(f"{path}: no '{prefix}.*.lora_A.weight' keys (is prefix={prefix!r} right?)")

    layers = linear_layers(model)
    unknown = sorted(n for n in pairs if n not in layers)
    incomplete = sorted(n for n, ab in pairs.items() if set(ab) != {"A", "B"})
    if unknown or incomplete:
        raise WeightsError(
            f"{path} does not fit {type(model).__name__}: modules not in the model {unknown}, "
            f"modules without both lora_A and lora_B {incomplete}"
        )
    for name in sorted(pairs):
        a, b = pairs[name]["A"], pairs[name]["B"]
        rank = a.shape[0]
        alpha = _pattern_value(meta.get("alpha_pattern", {}), name, meta.get("lora_alpha", rank))
        if isinstance(layers[name], LoRALinear):
            raise WeightsError(
                f"{name} already has a LoRA adapter: load_lora adds the adapters itself, so load "
                "into a model that has none at these layers (e.g. a fresh from_diffusers copy)"
            )
        try:
            attach_lora(model, name, a.T, b.T, alpha)
        except ValueError as error:
            raise WeightsError(f"{path}: {error}") from None
    return sorted(pairs)


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default
