"""A diffusers pipeline folder: its root, its checked ``model_index.json``, its scheduler config.

A pipeline folder (what ``pipe.save_pretrained`` writes, or a hub snapshot) holds a
``model_index.json`` naming the pipeline class and, per component, ``[library, class]`` and a
subfolder of the same name. The loaders of :mod:`jdpt.diffusion.pipeline_parts` (Flux) and
:mod:`jdpt.diffusion.sd_pipeline_parts` (SD, SDXL, SD3) open folders through :func:`open_pipeline`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jdpt.weights.files import WeightsError, locate

# Pipeline class (model_index.json's _class_name) -> the jdpt function that loads it.
LOADERS = {
    "FluxPipeline": "load_flux_pipeline",
    "StableDiffusionPipeline": "load_sd_pipeline",
    "StableDiffusionXLPipeline": "load_sdxl_pipeline",
    "StableDiffusion3Pipeline": "load_sd3_pipeline",
}
# Schedulers of SD/SDXL folders whose config jdpt turns into a DDIM schedule.
DDIM_CONVERTIBLE = ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler")


def pipeline_root(folder: str | os.PathLike, revision: str | None = None, cache_dir=None) -> Path:
    """The local folder of ``folder`` (a path, or a hub repo id in the local cache)."""
    path = locate(folder, revision, cache_dir)
    if path is None:
        raise WeightsError(f"pipeline folder {str(Path(folder).expanduser())!r} does not exist; pass a local "
                           "pipeline folder or a hub repo id (org/name) that is in the Hugging Face cache")
    if not path.is_dir():
        raise WeightsError(f"{str(path)!r} is a file; pass the pipeline folder holding model_index.json")
    return path


def read_index(root: Path) -> dict[str, Any]:
    """``root/model_index.json``, parsed (a clear error when the folder is not a pipeline)."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        hint = (" It is a single model folder: load it with jdpt.from_diffusers(folder)."
                if (root / "config.json").is_file() else "")
        raise WeightsError(f"{str(root)!r} has no model_index.json, so it is not a diffusers pipeline "
                           f"folder; pass the pipeline's root folder (saved by pipe.save_pretrained)."
                           f"{hint}")
    try:
        return json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{index_path}: not valid JSON ({e})") from None


def open_pipeline(folder, revision, cache_dir, pipeline: str, components: dict[str, tuple[str, ...] | None],
                  *, optional: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The pipeline root and its ``model_index.json``, checked: the pipeline class, every
    component's class (one of ``components[name]``; ``None``: any class; ``optional`` ones may be
    ``[null, null]``) and their subfolders."""
    root = pipeline_root(folder, revision, cache_dir)
    index = read_index(root)
    index_path = root / "model_index.json"
    name = index.get("_class_name")
    if name != pipeline:
        hint = f"; load it with {LOADERS[name]}" if name in LOADERS else ""
        raise WeightsError(f"{index_path}: pipeline class {name!r} is not a {pipeline}{hint}")
    present = []
    for component, classes in components.items():
        entry = index.get(component)
        if component in optional and entry in (None, [None, None]):
            continue
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise WeightsError(f"{index_path}: no {component!r} component ({component}: {entry!r}); "
                               f"jdpt's {pipeline} loader needs {list(components)}"
                               + (f" ({', '.join(optional)} may be null)" if optional else ""))
        if classes is not None and entry[1] not in classes:
            raise WeightsError(f"{index_path}: {component!r} is {entry}; jdpt's {pipeline} loader "
                               f"needs one of {list(classes)}"
                               + (" (set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler."
                                  "config) and save again)" if classes == DDIM_CONVERTIBLE else ""))
        present.append(component)
    missing = [c for c in present if not (root / c).is_dir()]
    if missing:
        raise WeightsError(f"pipeline folder {str(root)!r} lacks the subfolders {missing} that "
                           "model_index.json names; download the whole pipeline (e.g. `hf download "
                           "REPO`) or save it again with pipe.save_pretrained")
    return root, index


def read_scheduler_config(root: Path) -> tuple[dict[str, Any], str]:
    """``root/scheduler/scheduler_config.json`` parsed, and its path (for error messages)."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise WeightsError(f"{str(path)!r} is missing; download the pipeline's scheduler folder too, "
                           "or save the pipeline again with pipe.save_pretrained")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
