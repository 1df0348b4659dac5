"""Offline tensorflow-datasets builders of local files: Pick-a-Pic parquet, prompt lists and control
pairs, written as ``array_record`` and read back with random access (no TensorFlow). The Shapes
world's builders (:mod:`jdpt.world.builders`) derive from :class:`LocalBuilder` too.

Each builder is a ``tfds.core.GeneratorBasedBuilder``; prepare it once, then read it with
``builder.as_data_source(split)`` (a random-access source for :func:`jdpt.data.loading.make_loader`)
or later with ``tfds.builder_from_directory(path)``::

    builder = PickAPicPreferences(data_dir="/data/tfds", config="no_ties")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/pickapic_v2"))
    source = builder.as_data_source("train")  # source[i]["image_0"]: uint8 [H, W, 3]

The builders reading local files (:class:`PickAPicPreferences`, :class:`PromptList`,
:class:`ControlPairs`) find them in the manual dir (``DownloadConfig(manual_dir=...)``, default
``<data_dir>/downloads/manual``); each class's ``MANUAL_DOWNLOAD_INSTRUCTIONS`` gives the layout.
A split is named by its file (``train.txt``, ``validation-00000-of-00002.parquet``: the part of the
stem before the first ``-``). Examples keep their source order (``disable_shuffling``); shuffle when
loading.

What works without TensorFlow (checked against tensorflow-datasets 4.9.10; TF is not installed
here and the tests assert it is never imported):

- writing: ``GeneratorBasedBuilder.download_and_prepare`` with ``file_format="array_record"``
  (these builders' default; tfds' default ``tfrecord`` goes through TF). Keys are ints in source
  order.
- images: ``tfds.features.Image(encoding_format="png")`` stores PNG bytes. Its encoder runs
  TensorFlow only for numpy arrays (``tf.image.encode_png``), so the builders hand it RGB
  ``PIL.Image`` objects, which tfds saves with PIL. Reading through ``as_data_source`` decodes with
  ``decode_example_np`` (OpenCV if installed, else PIL) to uint8 ``[H, W, 3]``;
  ``decoders={"image": tfds.decode.SkipDecoding()}`` returns the PNG bytes instead, which
  :func:`jdpt.data.loading.decode_record` decodes inside the grain pipeline.
- text: ``tfds.features.Text`` reads back as UTF-8 ``bytes``.
- not available: ``tfds.load``, ``builder.as_dataset`` and ``Image.decode_example`` build
  ``tf.data`` pipelines and need TensorFlow.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from PIL import Image

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPORTED_ROWS = 10  # bad rows listed by name in a skip report

logger = logging.getLogger(__name__)


def _rgb_image() -> tfds.features.Image:
    return tfds.features.Image(shape=(None, None, 3), encoding_format="png")


def _open_rgb(data: bytes | Path) -> Image.Image:
    """An RGB PIL image from encoded bytes (JPEG, PNG, ...) or an image file."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.convert("RGB")


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _manual_dir(dl_manager) -> Path:
    return Path(os.fspath(dl_manager.manual_dir))  # tfds raises, naming the folder, when absent


def _split_of(path: Path) -> str:
    return path.stem.split("-")[0]


def _files_by_split(paths, folder: Path, layout: str) -> dict[str, list[Path]]:
    splits: dict[str, list[Path]] = {}
    for path in sorted(paths):
        splits.setdefault(_split_of(path), []).append(path)
    if not splits:
        raise FileNotFoundError(f"no input files in {folder}; expected layout:\n{layout}")
    return splits


def _check_columns(path: Path, present, required, fix: str) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(present)}. {fix}")


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """Writes ``array_record`` by default and keeps the examples in generation order."""

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _local_info(self, description: str, features: dict,
                    metadata: tfds.core.MetadataDict | None = None) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=description,
                                     features=tfds.features.FeaturesDict(features),
                                     metadata=metadata, disable_shuffling=True)


# --------------------------------------------------------------------------- Pick-a-Pic


@dataclasses.dataclass(eq=False)
class PickAPicConfig(tfds.core.BuilderConfig):
    """keep_ties: keep pairs with ``label_0 == 0.5`` (Diffusion-DPO drops them)."""

    keep_ties: bool = False


_PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
_PICKAPIC_LAYOUT = """\
<manual_dir>/**/<split>-*.parquet or <split>.parquet (the Hugging Face yuvalkirstain/pickapic_v2
layout, e.g. data/train-00000-of-00645.parquet), with columns caption (string), jpg_0 and jpg_1
(encoded image bytes), label_0 (float: 1 = image 0 preferred, 0 = image 1, 0.5 = tie) and
optionally label_1 (else 1 - label_0)."""


def _pickapic_problem(row: dict) -> str | None:
    """Why a Pick-a-Pic row cannot become an example (images aside), or None."""
    caption, label_0 = row["caption"], row["label_0"]
    if not isinstance(caption, str) or not caption.strip():
        return f"missing caption ({caption!r})"
    if label_0 not in (0.0, 0.5, 1.0):  # None and NaN are not in it either
        return f"label_0={label_0!r} is not 0, 0.5 or 1"
    label_1 = row.get("label_1")
    if label_1 is not None and not (isinstance(label_1, int | float) and math.isclose(label_1, 1.0 - label_0)):
        return f"label_1={label_1!r} is not 1 - label_0 = {1.0 - label_0}"
    return None


def _decode_pair(row: dict) -> tuple[tuple[Image.Image, Image.Image] | None, str | None]:
    """``((image_0, image_1), None)``, or ``(None, reason)`` when an image is absent or undecodable."""
    images = []
    for column in ("jpg_0", "jpg_1"):
        data = row[column]
        if not data:
            return None, f"{column} is empty ({data!r})"
        try:
            images.append(_open_rgb(data))
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
            return None, f"{column} undecodable ({type(error).__name__}: {error})"
    return (images[0], images[1]), None


class PickAPicPreferences(LocalBuilder):
    """Pick-a-Pic v2 preference pairs (Kirstain et al., 2023) from local parquet files.

    Features: ``caption`` (text), ``image_0`` / ``image_1`` (the JPEGs re-encoded as PNG, uint8
    ``[H, W, 3]`` when read), ``label_0`` / ``label_1`` (float32).

    Bad rows (a missing or blank caption, ``label_0`` not in {0, 0.5, 1}, ``label_1`` that is not
    ``1 - label_0``, an empty or undecodable image) are skipped, not fatal: each split's count and
    its first bad rows (``"<file relative to manual_dir>#<row>"`` with the reason) are logged as
    a warning and kept in ``builder.info.metadata["skipped_rows"]``
    (``{split: {"count": n, "rows": [{"row": ..., "reason": ...}, ...]}}``, saved with the
    dataset). A split left without any example by bad rows is an error.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pick-a-Pic v2 layout, images as PNG."}
    BUILDER_CONFIGS = [
        PickAPicConfig(name="no_ties", keep_ties=False, description="ties (label_0 = 0.5) dropped"),
        PickAPicConfig(name="with_ties", keep_ties=True, description="ties kept"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = _PICKAPIC_LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        return self._local_info(
            "Pick-a-Pic v2 preference pairs from local parquet files.",
            {"caption": tfds.features.Text(), "image_0": _rgb_image(), "image_1": _rgb_image(),
             "label_0": np.float32, "label_1": np.float32},
            metadata=tfds.core.MetadataDict(skipped_rows={}))

    def _split_generators(self, dl_manager):
        folder = _manual_dir(dl_manager)
        splits = _files_by_split(folder.rglob("*.parquet"), folder, _PICKAPIC_LAYOUT)
        for path in (p for files in splits.values() for p in files):
            _check_columns(path, pq.read_schema(path).names, _PICKAPIC_COLUMNS,
                           f"Expected layout:\n{_PICKAPIC_LAYOUT}")
        return {split: self._generate_examples(split, files, folder) for split, files in splits.items()}

    def _generate_examples(self, split: str, files: list[Path], folder: Path):
        key, kept, skipped = 0, 0, []
        for path in files:
            parquet = pq.ParquetFile(path)
            columns = [*_PICKAPIC_COLUMNS, *(["label_1"] if "label_1" in parquet.schema_arrow.names else [])]
            batches = parquet.iter_batches(batch_size=64, columns=columns)
            for index, row in enumerate(row for batch in batches for row in batch.to_pylist()):
                key += 1  # keys count every row, so a row's key does not depend on others being bad
                reason = _pickapic_problem(row)
                if reason is None and row["label_0"] == 0.5 and not self.builder_config.keep_ties:
                    continue
                images, reason = (None, reason) if reason else _decode_pair(row)
                if reason:
                    skipped.append({"row": f"{path.relative_to(folder)}#{index}", "reason": reason})
                    continue
                label_0, label_1 = float(row["label_0"]), row.get("label_1")
                kept += 1
                yield key, {"caption": row["caption"], "image_0": images[0], "image_1": images[1],
                            "label_0": label_0, "label_1": 1.0 - label_0 if label_1 is None else float(label_1)}
        self._report_skipped(split, key, kept, skipped)

    def _report_skipped(self, split: str, rows: int, kept: int, skipped: list[dict]) -> None:
        first = skipped[:_REPORTED_ROWS]
        self.info.metadata["skipped_rows"][split] = {"count": len(skipped), "rows": first}
        if not skipped:
            return
        listed = "; ".join(f"{bad['row']}: {bad['reason']}" for bad in first)
        if not kept:
            raise ValueError(f"Pick-a-Pic split {split!r}: no usable row, {len(skipped)} of {rows} are bad "
                             f"(first: {listed}); "
                             f"check the files against the layout:\n{_PICKAPIC_LAYOUT}")
        logger.warning("Pick-a-Pic split %r: skipped %d bad row(s) of %d; first %d: %s. The list is in "
                       "builder.info.metadata['skipped_rows']", split, len(skipped), rows, len(first), listed)


# --------------------------------------------------------------------------- prompt lists


@dataclasses.dataclass(eq=False)
class PromptListConfig(tfds.core.BuilderConfig):
    """column: the CSV column holding the prompts."""

    column: str = "prompt"


_PROMPT_LAYOUT = """\
<manual_dir>/<split>.txt (one prompt per line; blank lines are skipped) or <split>.csv (a header
row; the prompts in the config's column, "prompt" by default), e.g. train.txt, test.csv."""


class PromptList(LocalBuilder):
    """Prompts from local text or CSV files. Feature: ``prompt`` (text)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prompts from .txt or .csv files."}
    BUILDER_CONFIGS = [PromptListConfig(name="default", description='CSV column "prompt"')]
    MANUAL_DOWNLOAD_INSTRUCTIONS = _PROMPT_LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        return self._local_info("Prompts from local files.", {"prompt": tfds.features.Text()})

    def _split_generators(self, dl_manager):
        folder = _manual_dir(dl_manager)
        files = [p for p in folder.iterdir() if p.suffix in (".txt", ".csv")]
        splits = _files_by_split(files, folder, _PROMPT_LAYOUT)
        both = [s for s, paths in splits.items() if len(paths) > 1]
        if both:
            raise ValueError(f"split(s) {both} have several files in {folder}: "
                             f"{[p.name for s in both for p in splits[s]]}; keep one file per split")
        for path in files:
            if path.suffix == ".csv":
                with path.open(newline="", encoding="utf-8") as f:
                    _check_columns(path, next(csv.reader(f), []), [self.builder_config.column],
                                   'Name the prompt column with PromptListConfig(name=..., column=...)')
        return {split: self._generate_examples(path) for split, (path,) in splits.items()}

    def _generate_examples(self, path: Path):
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                prompts = (row[self.builder_config.column] for row in csv.DictReader(f))
            else:
                prompts = (line.strip() for line in f if line.strip())
            for key, prompt in enumerate(prompts):
                yield key, {"prompt": prompt}


# --------------------------------------------------------------------------- control pairs

_CONTROL_COLUMNS = ("image", "condition", "caption")
_CONTROL_LAYOUT = """\
either a folder per split, <manual_dir>/<split>/images/<name>.<png|jpg|jpeg|webp|bmp> with
<split>/conditions/<name>.<same suffixes> and <split>/captions/<name>.txt,
or a CSV index per split, <manual_dir>/<split>.csv with columns image, condition, caption (image
paths absolute or relative to manual_dir)."""


class ControlPairs(LocalBuilder):
    """(image, condition image, caption) triples for ControlNet-style training, from a local
    folder layout or a CSV index. Both images are stored as RGB PNG (a grey condition map is
    repeated over 3 channels) and must have the same size.

    Features: ``image``, ``condition`` (uint8 ``[H, W, 3]`` when read), ``caption`` (text).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Folder or CSV layout, images as PNG."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _CONTROL_LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        return self._local_info("Images with condition images and captions from local files.",
                                {"image": _rgb_image(), "condition": _rgb_image(),
                                 "caption": tfds.features.Text()})

    def _split_generators(self, dl_manager):
        folder = _manual_dir(dl_manager)
        splits = {p.stem: self._csv_triples(p, folder) for p in sorted(folder.glob("*.csv"))}
        for images in sorted(folder.glob("*/images")):
            split = images.parent.name
            if split in splits:
                raise ValueError(f"split {split!r} is both {folder / split}.csv and the folder "
                                 f"{images.parent}; keep one")
            splits[split] = self._folder_triples(images.parent)
        if not splits:
            raise FileNotFoundError(f"no input files in {folder}; expected layout:\n{_CONTROL_LAYOUT}")
        return {split: self._generate_examples(triples) for split, triples in splits.items()}

    @staticmethod
    def _csv_triples(path: Path, folder: Path) -> list[tuple[Path, Path, str]]:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            _check_columns(path, reader.fieldnames or [], _CONTROL_COLUMNS,
                           f"Expected layout:\n{_CONTROL_LAYOUT}")
            return [(folder / row["image"], folder / row["condition"], row["caption"]) for row in reader]

    @staticmethod
    def _folder_triples(split_dir: Path) -> list[tuple[Path, Path, str]]:
        conditions = {p.stem: p for p in _image_files(split_dir / "conditions")}
        triples = []
        for image in _image_files(split_dir / "images"):
            caption = split_dir / "captions" / (image.stem + ".txt")
            if image.stem not in conditions or not caption.is_file():
                raise FileNotFoundError(
                    f"{image} needs a condition image {split_dir}/conditions/{image.stem}.<png|jpg|...> "
                    f"and a caption file {caption}; layout:\n{_CONTROL_LAYOUT}")
            triples.append((image, conditions[image.stem], caption.read_text(encoding="utf-8").strip()))
        return triples

    def _generate_examples(self, triples: list[tuple[Path, Path, str]]):
        for key, (image_path, condition_path, caption) in enumerate(triples):
            for path in (image_path, condition_path):
                if not path.is_file():
                    raise FileNotFoundError(f"{path} (listed in the control-pair index) does not exist; "
                                            "paths in the CSV are relative to manual_dir")
            image, condition = _open_rgb(image_path), _open_rgb(condition_path)
            if image.size != condition.size:
                raise ValueError(f"{image_path} is {image.size[0]}x{image.size[1]} but its condition "
                                 f"{condition_path} is {condition.size[0]}x{condition.size[1]}; "
                                 "resize them to the same size")
            yield key, {"image": image, "condition": condition, "caption": caption}
