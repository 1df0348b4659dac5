"""Where the Shapes-world base models live: Orbax checkpoints in ``$JDPT_CACHE`` (default
``~/.cache/jdpt``), one folder per preset, trained once and reused.

A model folder holds ``world.json`` (the world and training configs, the pretraining history and
its evaluation) beside ``text_encoder/`` and the denoiser, ``transformer/`` (Flux) or ``unet/``
(``jdpt.weights.save`` checkpoints).
A folder written for another configuration is never trained over: loading it raises an error that
names the differing settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jdpt.weights import checkpoint
from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS, WorldConfig, WorldModel
from jdpt.world.evaluation import eval_prompts, evaluate
from jdpt.world.pretraining import PretrainConfig, pretrain
from jdpt.world.unet_model import UNetWorldConfig, UNetWorldModel

World = WorldConfig | UNetWorldConfig
Model = WorldModel | UNetWorldModel
_ARCHS: dict[str, tuple[type, type]] = {"flux": (WorldConfig, WorldModel), "unet": (UNetWorldConfig, UNetWorldModel)}

FORMAT = "jdpt-shapes-world-1"
META = "world.json"

PRESETS: dict[str, tuple[World, PretrainConfig]] = {
    # The README's base model: ~12 minutes on 2 CPU cores. 8x8-pixel tokens predicting x0, trained
    # towards high noise (experiments/results/pretrain_shapes_default.md says why).
    "default": (WorldConfig(pixel_factor=4, prediction="sample", noise_mean=0.8), PretrainConfig(steps=4500)),
    # CI's reduced pretraining: under 2 minutes on 2 CPU cores, still clearly above chance.
    "ci": (WorldConfig(width=64, heads=2, text_layers=1, double_layers=1, single_layers=1, pixel_factor=4,
                       prediction="sample", noise_mean=0.8),
           PretrainConfig(steps=2500, batch_size=32, learning_rate=2e-3, warmup_steps=100)),
    # The UNet-family base model (eps-prediction DDPM): the SD-style methods' ground.
    "unet": (UNetWorldConfig(), PretrainConfig(steps=1000)),
    # Its CI size.
    "unet-ci": (UNetWorldConfig(width=64, heads=2, text_layers=1, block_out_channels=(32, 64)),
                PretrainConfig(steps=300, batch_size=32, learning_rate=2e-3, warmup_steps=30)),
}


class CacheError(RuntimeError):
    """A cache folder cannot be used (unwritable, or holding another configuration's model)."""


def cache_root() -> Path:
    """``$JDPT_CACHE`` or ``~/.cache/jdpt``."""
    return Path(os.environ.get("JDPT_CACHE") or "~/.cache/jdpt").expanduser()


def model_dir(preset: str, root: str | Path | None = None) -> Path:
    """The folder of a preset's base model."""
    return Path(root if root is not None else cache_root()) / "shapes" / preset


def world_from_dict(raw: dict[str, Any]) -> World:
    """A world config from its ``to_dict`` form (folders written before ``arch`` existed: Flux)."""
    arch = raw.get("arch", "flux")
    if arch not in _ARCHS:
        raise CacheError(f"unknown model architecture {arch!r}; jdpt knows {sorted(_ARCHS)}")
    return _ARCHS[arch][0].from_dict(raw)


def describe(world: World, train: PretrainConfig) -> dict[str, Any]:
    return {"world": world.to_dict(), "pretrain": dataclasses.asdict(train)}


def save_model(model: Model, directory: str | Path, *, train: PretrainConfig, info: dict) -> Path:
    """Write ``model`` and ``world.json`` to ``directory`` atomically (a crash leaves no half
    checkpoint behind: it is written beside the target and renamed into place)."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise CacheError(f"{directory} exists; save into a new folder (or delete it first)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        checkpoint.save(model.text_encoder, tmp / "text_encoder", overwrite=True)
        name = model.denoiser_name
        checkpoint.save(getattr(model, name), tmp / name, overwrite=True)
        meta = {"format": FORMAT, **describe(model.config, train), **info}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise CacheError(f"{directory} holds no Shapes-world model ({META} is missing)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CacheError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_model(directory: str | Path) -> tuple[Model, dict[str, Any]]:
    """Restore a model folder written by :func:`save_model`; returns it and its ``world.json``."""
    directory = Path(directory)
    meta = read_meta(directory)
    world = world_from_dict(meta["world"])
    model_class = _ARCHS[world.arch][1]
    name = model_class.denoiser_name
    model = model_class(world, rngs=None, text_encoder=checkpoint.restore(directory / "text_encoder"),
                        **{name: checkpoint.restore(directory / name)})
    return model, meta


def _differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple | list) and list(a) == list(b)):
            out.append(f"{prefix}{k}: stored {a!r}, wanted {b!r}")
    return out


def check_writable(directory: Path) -> None:
    """Raise :class:`CacheError` unless files can be created in ``directory``'s parent."""
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CacheError(
            f"cannot write the model cache at {parent} ({e.strerror or e}); point JDPT_CACHE at a "
            "writable folder (or pass cache_dir=)"
        ) from None


def base_model(preset: str = "default", *, cache_dir: str | Path | None = None, progress: bool = True,
               world: World | None = None, train: PretrainConfig | None = None
               ) -> tuple[Model, dict[str, Any]]:
    """The pretrained Shapes-world model of ``preset``: loaded from the cache, or pretrained
    (with a progress bar), evaluated and cached on first use.

    ``world`` / ``train`` override the preset's configs; a cached model of different configs is
    an error, never retrained over. Pretraining checkpoints into a run folder beside the model
    folder (``.<preset>-pretraining-<config hash>``), so an interrupted first run resumes where it
    stopped; the folder is removed once the model is saved.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    world = world or PRESETS[preset][0]
    train = train or PRESETS[preset][1]
    directory = model_dir(preset, cache_dir)
    if (directory / META).exists():
        stored = read_meta(directory)
        diff = _differences(describe(world_from_dict(stored["world"]), PretrainConfig(**stored["pretrain"])),
                            describe(world, train))
        if diff:
            raise CacheError(
                f"{directory} holds a {preset!r} model of another configuration ({'; '.join(diff)}). "
                "It is not retrained over: delete that folder, or use another cache "
                "(JDPT_CACHE=... or cache_dir=)"
            )
        return load_model(directory)
    if directory.exists() and any(directory.iterdir()):
        raise CacheError(f"{directory} is not empty but holds no {META}; delete it or use another cache")
    check_writable(directory)
    digest = hashlib.sha256(json.dumps(describe(world, train), sort_keys=True).encode()).hexdigest()[:10]
    run = directory.parent / f".{preset}-pretraining-{digest}"
    if progress:
        resumed = " (resuming an interrupted run)" if run.exists() else ""
        print(f"pretraining the Shapes-world {preset!r} base model into {directory}: {train.steps} steps of "
              f"{train.batch_size} pairs{resumed}; interrupt any time, the next run resumes from the last "
              "checkpoint", flush=True)
    model, history = pretrain(world, train, progress=progress, checkpoint_dir=run)
    _, verdict = evaluate(model, eval_prompts(32, world), progress=progress)
    info = {"history": history, "eval": {"n_per_category": 32, "steps": SAMPLING_STEPS, "cfg_scale": CFG_SCALE,
                                         **verdict.summary()}}
    if directory.exists():
        directory.rmdir()
    save_model(model, directory, train=train, info=info)
    shutil.rmtree(run, ignore_errors=True)
    return model, read_meta(directory)


