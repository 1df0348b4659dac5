"""Orbax checkpoints of jdpt models: arrays plus the config (and LoRA layout) beside them.

Layout of a checkpoint directory::

    jdpt_model.json   # reference class, config, LoRA adapters (rank, alpha, merged)
    state/            # Orbax arrays, one per parameter, keyed by graph path

``restore`` needs nothing but the directory. With a ``mesh`` it restores every array straight
into its target ``NamedSharding`` (from the parameters' logical axes and the rules table), so a
model larger than one device's memory never materialises on one device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jdpt.models.lora import add_lora, lora_layers
from jdpt.parallel.mesh import DEFAULT_RULES, Rules, param_shardings
from jdpt.weights.diffusers import model_class
from jdpt.weights.files import WeightsError

FORMAT = "jdpt-orbax-1"
META = "jdpt_model.json"


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def save(module: nnx.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``module``'s parameters (LoRA adapters included) and config to ``directory``."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} is not empty; pass overwrite=True to replace it")
    config = module.config
    meta = {
        "format": FORMAT,
        "reference_class": config.reference_class,
        "config": config.to_dict(),
        "lora": {name: {"rank": l.rank, "alpha": l.alpha, "merged": l.merged}
                 for name, l in lora_layers(module).items()},
    }
    arrays = {_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "state", arrays, force=overwrite)
    checkpointer.wait_until_finished()
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def restore(directory: str | Path, *, mesh: Mesh | None = None, rules: Rules | None = None) -> nnx.Module:
    """Rebuild the model saved by :func:`save`, keeping the stored dtypes.

    Args:
        directory: the checkpoint directory.
        mesh: restore each parameter directly into its sharding on this mesh (default: all on
            the first local device).
        rules: logical-axis rules (``jdpt.parallel.DEFAULT_RULES`` by default).
    """
    directory = Path(directory).absolute()
    meta_path = directory / META
    if not meta_path.is_file():
        raise WeightsError(f"{directory} is not a jdpt checkpoint: no {META} (write one with jdpt.weights.save)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}; expected {FORMAT!r}")
    cls = model_class(meta["reference_class"])
    config = cls.config_class.from_dict(meta["config"], source=str(meta_path))

    def build() -> nnx.Module:
        model = cls(config, rngs=nnx.Rngs(0))
        for name, spec in meta["lora"].items():
            add_lora(model, re.escape(name), rank=spec["rank"], alpha=spec["alpha"])
        return model

    abstract = nnx.eval_shape(build)
    for name, layer in lora_layers(abstract).items():
        layer.merged = meta["lora"][name]["merged"]
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(directory / "state").item_metadata.tree
    flat = dict(nnx.to_flat_state(params))
    keys = {_key(p) for p in flat}
    missing, unexpected = sorted(keys - set(stored)), sorted(set(stored) - keys)
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint {directory} does not fit {cls.__name__}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(params, mesh, rules or DEFAULT_RULES)))
    target: dict[str, Any] = {}
    for path, var in flat.items():
        key = _key(path)
        sharding = (shardings[path].get_value() if mesh is not None
                    else SingleDeviceSharding(jax.local_devices()[0]))
        target[key] = jax.ShapeDtypeStruct(var.get_value().shape, stored[key].dtype, sharding=sharding)
    arrays = checkpointer.restore(directory / "state", target)
    for path, var in flat.items():
        var.set_value(arrays[_key(path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
