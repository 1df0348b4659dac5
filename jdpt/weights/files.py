"""Reading and writing safetensors folders (single file or sharded with an index), locally or
from the Hugging Face hub cache. Never loads pickles."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file


class WeightsError(ValueError):
    """Weights or their folder are not what the model needs; the message says what to fix."""


# File stems the reference libraries use: diffusers models, transformers models.
STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def resolve_folder(name_or_path: str | os.PathLike, *, subfolder: str | None = None,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder, or a hub repo id resolved from the local Hugging Face cache (no network).

    ``subfolder`` selects a pipeline component (``"transformer"``, ``"vae"``, ``"text_encoder"``);
    ``cache_dir`` overrides the hub cache location (default ``$HF_HUB_CACHE``).
    """
    path = locate(name_or_path, revision, cache_dir)
    if path is None:
        raise WeightsError(f"weights folder {str(Path(name_or_path).expanduser())!r} does not exist")
    if subfolder:
        path = path / subfolder
        if not path.is_dir():
            raise WeightsError(f"{str(path)!r} does not exist: no subfolder {subfolder!r} there")
    if not path.is_dir():
        raise WeightsError(f"{str(path)!r} is not a folder")
    if not (path / "config.json").is_file():
        index = path / "model_index.json"
        if index.is_file():
            parts = sorted(k for k in json.loads(index.read_text()) if not k.startswith("_"))
            raise WeightsError(
                f"{str(path)!r} is a pipeline folder; pass subfolder= one of its components: {parts}"
            )
        raise WeightsError(f"{str(path)!r} has no config.json; is it a diffusers model folder?")
    return path


def locate(name_or_path: str | os.PathLike, revision: str | None, cache_dir) -> Path | None:
    """An existing local path, or the cached snapshot of a hub repo id (``org/name``); None when
    ``name_or_path`` is neither an existing path nor shaped like a repo id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _from_hub_cache(text, revision, cache_dir)
    return None


def _from_hub_cache(repo_id: str, revision: str | None, cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise WeightsError(
            f"{repo_id!r} is neither a local folder nor in the Hugging Face cache "
            f"({e.__class__.__name__}); download it first (`hf download {repo_id}`) or pass a path"
        ) from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


class TensorFiles(Mapping[str, np.ndarray]):
    """Lazy read-only mapping ``key -> np.ndarray`` over a folder's safetensors files."""

    def __init__(self, folder: Path, stem: str | None = None):
        self.folder = folder
        self._where: dict[str, Path] = {}
        stems = [stem] if stem else list(STEMS.values())
        for s in stems:
            index = folder / f"{s}.safetensors.index.json"
            single = folder / f"{s}.safetensors"
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise WeightsError(f"{index}: no 'weight_map' in the index")
                for key, name in weight_map.items():
                    self._where[key] = folder / name
                missing = sorted({str(p) for p in self._where.values() if not p.is_file()})
                if missing:
                    raise WeightsError(f"{index} names shard files that are missing: {missing}")
                for shard in set(self._where.values()):
                    _header_keys(shard)  # fail early on a damaged shard, naming it
                break
            if single.is_file():
                self._where = {k: single for k in _header_keys(single)}
                break
        else:
            found = sorted(p.name for p in folder.iterdir())
            pickles = [f for f in found if f.endswith((".bin", ".pt", ".ckpt", ".pth"))]
            hint = (
                f" Only pickled weights are there ({pickles}); jdpt never loads pickles: convert "
                "them with `save_pretrained(..., safe_serialization=True)`."
                if pickles
                else ""
            )
            raise WeightsError(
                f"no {' or '.join(s + '.safetensors[.index.json]' for s in stems)} in "
                f"{str(folder)!r} (found: {found}).{hint}"
            )

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._where[key]
        try:
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(key)
        except SafetensorError as e:
            raise WeightsError(f"{path}: cannot read tensor {key!r} ({e}); the file is damaged") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _header_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
    except SafetensorError as e:
        raise WeightsError(
            f"{path}: not a readable safetensors file ({e}); it is truncated or damaged - "
            "download or write it again"
        ) from None
    return keys


def write_tensors(tensors: Mapping[str, np.ndarray], folder: Path, stem: str, *,
                  max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as ``{stem}.safetensors`` or, above ``max_shard_bytes``, as shards
    ``{stem}-0000i-of-0000n.safetensors`` with a ``{stem}.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{stem}.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for s in shards for a in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
