"""Diffusers/transformers state dicts <-> jdpt NNX modules.

Every reference key of a module is derived from its module tree (:mod:`jdpt.models.keys`). A root
module may also declare ``torch_aliases`` (file key -> canonical key, for tied weights saved under
another name) and ``torch_ignored`` (regexes of file keys that hold no parameter, e.g. buffers).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.models.keys import to_ours, to_torch, torch_key_map
from jdpt.weights.files import STEMS, TensorFiles, WeightsError, read_config, resolve_folder, write_tensors

# Reference class name -> "module:Class" of the jdpt model (imported lazily).
MODEL_CLASSES: dict[str, str] = {
    "FluxTransformer2DModel": "jdpt.models.flux:FluxTransformer",
    "AutoencoderKL": "jdpt.models.vae:AutoencoderKL",
    "CLIPTextModel": "jdpt.models.clip:CLIPTextModel",
    "CLIPTextModelWithProjection": "jdpt.models.clip:CLIPTextModelWithProjection",
    "T5EncoderModel": "jdpt.models.t5:T5EncoderModel",
    "UNet2DConditionModel": "jdpt.models.unet:UNet2DConditionModel",
    "SD3Transformer2DModel": "jdpt.models.sd3:SD3Transformer",
    "ControlNetModel": "jdpt.models.controlnet:ControlNetModel",
    "FluxControlNetModel": "jdpt.models.flux_controlnet:FluxControlNetModel",
}


def model_class(reference_class: str) -> type:
    try:
        module, cls = MODEL_CLASSES[reference_class].split(":")
    except KeyError:
        raise WeightsError(
            f"jdpt has no port of {reference_class!r}; supported classes: {sorted(MODEL_CLASSES)}"
        ) from None
    return getattr(importlib.import_module(module), cls)


def reference_class_of(config: Mapping[str, Any], source: str) -> str:
    if "_class_name" in config:
        return config["_class_name"]
    archs = config.get("architectures") or []
    if len(archs) == 1:
        return archs[0]
    raise WeightsError(
        f"{source}: cannot tell the model class: no '_class_name' (diffusers) and "
        f"'architectures' is {archs!r} (transformers; one entry expected)"
    )


def abstract_model(cls: type, config: Any) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes and structure without memory."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def load_state_dict(
    abstract: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    *,
    source: str,
    dtype: Any = None,
    place: Callable[[tuple, np.ndarray], jax.Array] | None = None,
) -> nnx.Module:
    """Fill an abstract model with reference-layout ``tensors``, checking every key and shape.

    ``dtype`` casts floating tensors; ``place(path, array)`` puts an array on devices (default:
    ``jnp.asarray``). Raises :class:`WeightsError` naming every missing, unexpected and mis-shaped
    key at once.
    """
    slots = torch_key_map(abstract)
    aliases: Mapping[str, str] = getattr(abstract, "torch_aliases", {})
    ignored = [re.compile(p) for p in getattr(abstract, "torch_ignored", ())]
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))

    present: dict[str, str] = {}  # canonical key -> key in the file (an alias of a tied weight)
    for k in tensors:
        canonical = aliases.get(k, k)
        if canonical not in present or k == canonical:
            present[canonical] = k
    missing = sorted(k for k in slots if k not in present)
    unexpected = sorted(
        k for k in tensors
        if aliases.get(k, k) not in slots and not any(p.fullmatch(k) for p in ignored)
    )
    bad_shape, values = [], {}
    for key, slot in slots.items():
        if key not in present:
            continue
        arr = tensors[present[key]]
        arr = to_ours(np.asarray(arr), slot.layout)
        want = flat[slot.path].get_value().shape
        if arr.shape != tuple(want):
            bad_shape.append(f"{key}: file {tuple(to_torch(arr, slot.layout).shape)}, model "
                             f"{tuple(to_torch(np.empty(want, np.int8), slot.layout).shape)}")
            continue
        values[slot.path] = arr
    if missing or unexpected or bad_shape:
        lines = [f"weights in {source} do not fit {type(abstract).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if bad_shape:
            lines.append(f"  mis-shaped keys ({len(bad_shape)}): {bad_shape}")
        lines.append("  Check that config.json belongs to these weights.")
        raise WeightsError("\n".join(lines))

    place = place or (lambda path, arr: jnp.asarray(arr))
    for path, var in flat.items():
        if path not in values:
            raise WeightsError(f"{type(abstract).__name__} has a parameter at {path} with no reference key")
        arr = values[path]
        if dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(dtype)
        var.set_value(place(path, arr))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_diffusers(
    name_or_path: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    dtype: Any = None,
) -> nnx.Module:
    """Load a diffusers or transformers model folder (``config.json`` + safetensors) as a jdpt model.

    Args:
        name_or_path: a local folder, or a hub repo id found in the local Hugging Face cache.
        subfolder: pipeline component, e.g. ``"transformer"``, ``"vae"``, ``"text_encoder_2"``.
        revision: hub revision (branch, tag or commit) when resolving from the cache.
        cache_dir: hub cache location (default ``$HF_HUB_CACHE``).
        dtype: cast floating parameters to this dtype (e.g. ``jnp.bfloat16``); default keeps the
            stored dtype.

    Returns:
        The NNX module of the class named by ``_class_name`` / ``architectures``.
    """
    folder = resolve_folder(name_or_path, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    raw = read_config(folder)
    source = str(folder / "config.json")
    cls = model_class(reference_class_of(raw, source))
    config = cls.config_class.from_dict(raw, source=source)
    tensors = TensorFiles(folder, STEMS[config.library])
    return load_state_dict(abstract_model(cls, config), tensors, source=str(folder), dtype=dtype)


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The reference-layout state dict of ``model`` as host numpy arrays."""
    from jdpt.models.lora import has_unmerged_lora

    if has_unmerged_lora(model):
        raise WeightsError(
            "the model has unmerged LoRA adapters; call jdpt.models.lora.merge_lora(model) to "
            "export merged weights, or save the adapters alone with jdpt.weights.lora.save_lora"
        )
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {
        key: to_torch(np.asarray(jax.device_get(state[slot.path].get_value())), slot.layout)
        for key, slot in torch_key_map(model).items()
    }


def to_diffusers(model: nnx.Module, folder: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` as a diffusers/transformers folder that ``from_pretrained`` loads.

    Writes ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``).
    """
    folder = Path(folder)
    config = model.config
    tensors = state_dict(model)
    write_tensors(tensors, folder, STEMS[config.library], max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return folder
