"""Offline tfds builders: files written here, prepared as array_record, read back without TF."""

from __future__ import annotations

import csv
import io
import logging
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jdpt.data import preference_pairs
from jdpt.data.builders import ControlPairs, PickAPicPreferences, PromptList, PromptListConfig
from jdpt.world.builders import ShapesPairs, ShapesPairsConfig, ShapesPreferences, ShapesPreferencesConfig
from jdpt.world.scenes import render, sample_pairs, sample_prompts
from jdpt.world.verifier import verify


def _prepare(builder_cls, tmp_path, manual_dir=None, config=None):
    builder = builder_cls(data_dir=tmp_path / "tfds", config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def _records(builder, split="train"):
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def _photo(rng, height, width) -> np.ndarray:
    """A smooth random RGB image (something JPEG compresses like a photo)."""
    y, x = np.mgrid[:height, :width]
    base = rng.integers(0, 256, 3) + 3 * x[..., None] - 2 * y[..., None]
    return np.clip(base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _write_pickapic(folder, name, labels, rng, with_label_1):
    rows = {"caption": [f"{name} caption {i}, with ünïcode" for i in range(len(labels))],
            "jpg_0": [_encode(_photo(rng, 12, 16), "JPEG") for _ in labels],
            "jpg_1": [_encode(_photo(rng, 10, 10), "JPEG") for _ in labels],
            "label_0": labels, "ranking_id": list(range(len(labels)))}
    if with_label_1:
        rows["label_1"] = [1.0 - x for x in labels]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "data" / f"{name}.parquet", row_group_size=2)
    return rows


@pytest.mark.parametrize("config", ["no_ties", "with_ties"])
def test_pickapic_round_trip(tmp_path, config):
    rng = np.random.default_rng(0)
    manual = tmp_path / "pickapic"
    shards = [_write_pickapic(manual, "train-00000-of-00002", [1.0, 0.5, 0.0], rng, True),
              _write_pickapic(manual, "train-00001-of-00002", [0.5, 0.0], rng, False)]
    validation = _write_pickapic(manual, "validation-00000-of-00001", [0.0, 1.0], rng, False)
    builder = _prepare(PickAPicPreferences, tmp_path, manual, config)
    assert set(builder.info.splits) == {"train", "validation"}
    for split, files in (("train", shards), ("validation", [validation])):
        expected = [(c, j0, j1, l) for rows in files
                    for c, j0, j1, l in zip(rows["caption"], rows["jpg_0"], rows["jpg_1"], rows["label_0"])
                    if config == "with_ties" or l != 0.5]
        records = _records(builder, split)
        assert len(records) == len(expected)
        for record, (caption, jpg_0, jpg_1, label_0) in zip(records, expected):  # source order kept
            assert record["caption"].decode() == caption
            assert record["image_0"].dtype == np.uint8 and record["image_0"].shape == (12, 16, 3)
            np.testing.assert_array_equal(record["image_0"], _decoded(jpg_0))  # PNG is lossless
            np.testing.assert_array_equal(record["image_1"], _decoded(jpg_1))
            assert (record["label_0"], record["label_1"]) == (label_0, 1.0 - label_0)
    # A reader needs no builder class: the folder describes itself.
    reopened = tfds.builder_from_directory(builder.data_dir)
    assert reopened.info.features["image_0"].encoding_format == "png"
    assert len(reopened.as_data_source("train")) == len(builder.as_data_source("train"))
    assert "tensorflow" not in sys.modules


def test_pickapic_errors_name_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(AssertionError, match=rf"(?s){missing}.*<split>-\*\.parquet"):
        _prepare(PickAPicPreferences, tmp_path, missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no parquet here")
    with pytest.raises(FileNotFoundError, match=rf"(?s)no input files in {tmp_path / 'empty'}.*parquet"):
        _prepare(PickAPicPreferences, tmp_path, tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""], "jpg_1": [b""]}), bad / "train.parquet")
    with pytest.raises(ValueError, match=r"train\.parquet lacks column\(s\) \['label_0'\]"):
        _prepare(PickAPicPreferences, tmp_path, bad)


def test_pickapic_bad_rows_are_reported_and_skipped(tmp_path, caplog):
    rng = np.random.default_rng(2)
    jpg = [_encode(_photo(rng, 6, 8), "JPEG") for _ in range(20)]
    rows = [  # (caption, jpg_0, jpg_1, label_0, label_1, why it is bad or None)
        ("good 0", jpg[0], jpg[1], 1.0, 0.0, None),
        ("bad bytes", b"not an image", jpg[2], 1.0, 0.0, r"jpg_0 undecodable \(UnidentifiedImageError"),
        (None, jpg[3], jpg[4], 0.0, 1.0, r"missing caption \(None\)"),
        ("good 1", jpg[5], jpg[6], 0.0, 1.0, None),
        ("odd label", jpg[7], jpg[8], 0.3, 0.7, r"label_0=0\.3 is not 0, 0\.5 or 1"),
        ("a tie", jpg[9], b"", 0.5, 0.5, None),  # dropped as a tie (no_ties) before its images are read
        ("cut short", jpg[10], jpg[11][: len(jpg[11]) // 2], 1.0, 0.0, r"jpg_1 undecodable \(OSError"),
        ("   ", jpg[12], jpg[13], 1.0, 0.0, r"missing caption \('   '\)"),
        ("labels disagree", jpg[14], jpg[15], 1.0, 1.0, r"label_1=1\.0 is not 1 - label_0 = 0\.0"),
        ("nan label", jpg[16], jpg[17], float("nan"), 0.0, r"label_0=nan is not"),
        ("no image", None, jpg[18], 0.0, 1.0, r"jpg_0 is empty \(None\)"),
        ("good 2", jpg[19], jpg[0], 1.0, 0.0, None),
    ]
    manual = tmp_path / "pickapic"
    (manual / "data").mkdir(parents=True)
    columns = list(zip(*rows))
    pq.write_table(pa.table({"caption": pa.array(columns[0], pa.string()), "jpg_0": pa.array(columns[1], pa.binary()),
                             "jpg_1": pa.array(columns[2], pa.binary()), "label_0": columns[3],
                             "label_1": columns[4]}), manual / "data" / "train-00000-of-00001.parquet",
                   row_group_size=5)
    with caplog.at_level(logging.WARNING, logger="jdpt.data.builders"):
        builder = _prepare(PickAPicPreferences, tmp_path, manual, "no_ties")
    good = [row for row in rows if row[5] is None and row[3] != 0.5]
    records = _records(builder)
    assert [r["caption"].decode() for r in records] == [row[0] for row in good]
    for record, row in zip(records, good):
        np.testing.assert_array_equal(record["image_0"], _decoded(row[1]))
        np.testing.assert_array_equal(record["image_1"], _decoded(row[2]))
        assert (record["label_0"], record["label_1"]) == (row[3], row[4])
    bad = [(i, row[5]) for i, row in enumerate(rows) if row[5] is not None]
    report = builder.info.metadata["skipped_rows"]["train"]
    assert report["count"] == len(bad) == 8
    assert [r["row"] for r in report["rows"]] == [f"data/train-00000-of-00001.parquet#{i}" for i, _ in bad]
    for entry, (_, pattern) in zip(report["rows"], bad, strict=True):
        assert re.match(pattern, entry["reason"]), (entry, pattern)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "jdpt.data.builders"]
    assert re.match(r"Pick-a-Pic split 'train': skipped 8 bad row\(s\) of 12; first 8: "
                    r"data/train-00000-of-00001\.parquet#1: jpg_0 undecodable", message)
    reopened = tfds.builder_from_directory(builder.data_dir)  # the report is saved with the dataset
    assert reopened.info.metadata["skipped_rows"]["train"] == report
    # A split left without any example is an error naming its bad rows.
    (manual / "data" / "train-00000-of-00001.parquet").unlink()
    pq.write_table(pa.table({"caption": [None, "x", "a tie"], "jpg_0": [b"", b"?", b"?"],
                             "jpg_1": [b"", b"?", b"?"], "label_0": [1.0, 2.0, 0.5]}),
                   manual / "data" / "train.parquet")  # the tie is dropped (no_ties), the rest is bad
    with pytest.raises(ValueError, match=r"split 'train': no usable row, 2 of 3 are bad \(first: data/train\.parquet#0: "
                                         r"missing caption.*#1: label_0=2\.0 is not 0, 0\.5 or 1"):
        _prepare(PickAPicPreferences, tmp_path / "again", manual)


def test_prompt_list_from_txt_and_csv(tmp_path):
    manual = tmp_path / "prompts"
    manual.mkdir()
    (manual / "train.txt").write_text("a red cube\n\n  two cats, sleeping  \nünïcode prompt\n",
                                      encoding="utf-8")
    with (manual / "test.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([[0, 'a "quoted", comma prompt'], [1, "line\nbreak"], [2, ""]])
    builder = _prepare(PromptList, tmp_path, manual, PromptListConfig(name="text", column="text"))
    assert [r["prompt"].decode() for r in _records(builder, "train")] == [
        "a red cube", "two cats, sleeping", "ünïcode prompt"]
    assert [r["prompt"].decode() for r in _records(builder, "test")] == [
        'a "quoted", comma prompt', "line\nbreak", ""]
    with pytest.raises(ValueError, match=r"test\.csv lacks column\(s\) \['prompt'\]; it has \['id', 'text'\]"):
        _prepare(PromptList, tmp_path / "other", manual)


def _save(path, image: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_control_pairs_from_folder_and_csv(tmp_path):
    rng = np.random.default_rng(1)
    manual = tmp_path / "control"
    expected = {"train": [], "validation": []}
    for name in ("b", "a"):  # folder layout, read in name order
        image, edges = _photo(rng, 8, 6), (rng.random((8, 6)) < 0.3).astype(np.uint8) * 255
        _save(manual / "train" / "images" / f"{name}.png", image)
        _save(manual / "train" / "conditions" / f"{name}.png", edges)  # grey, stored as RGB
        (manual / "train" / "captions").mkdir(exist_ok=True)
        (manual / "train" / "captions" / f"{name}.txt").write_text(f"caption {name}\n")
        expected["train"].insert(0, (image, np.repeat(edges[..., None], 3, -1), f"caption {name}"))
    rows = []
    for i in range(3):  # CSV index with paths relative to manual_dir
        image, condition = _photo(rng, 5, 7), _photo(rng, 5, 7)
        _save(manual / "files" / f"{i}.png", image)
        _save(manual / "files" / f"{i}_cond.png", condition)
        rows.append({"image": f"files/{i}.png", "condition": f"files/{i}_cond.png", "caption": f"c{i}"})
        expected["validation"].append((image, condition, f"c{i}"))
    with (manual / "validation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "condition", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    builder = _prepare(ControlPairs, tmp_path, manual)
    for split, triples in expected.items():
        records = _records(builder, split)
        assert len(records) == len(triples)
        for record, (image, condition, caption) in zip(records, triples):
            np.testing.assert_array_equal(record["image"], image)
            np.testing.assert_array_equal(record["condition"], condition)
            assert record["caption"].decode() == caption
    (manual / "train" / "captions" / "a.txt").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"a\.png needs a condition image .* and a caption file .*captions/a\.txt"):
        _prepare(ControlPairs, tmp_path / "again", manual)


def test_shapes_pairs_equal_the_renderer(tmp_path):
    config = ShapesPairsConfig(name="n24_seed5", num_examples=24, seed=5)
    records = _records(_prepare(ShapesPairs, tmp_path, config=config))
    prompts, images = sample_pairs(5, 24)
    assert [r["prompt"].decode() for r in records] == [p.text for p in prompts]
    assert [r["category"].decode() for r in records] == [p.category for p in prompts]
    np.testing.assert_array_equal(np.stack([r["image"] for r in records]), images)


def test_shapes_preferences_follow_the_documented_recipe(tmp_path):
    n, k, seed = 12, 4, 7
    config = ShapesPreferencesConfig(name="small", num_prompts=n, samples_per_prompt=k,
                                     max_pairs_per_prompt=2, seed=seed)
    records = _records(_prepare(ShapesPreferences, tmp_path, config=config))
    rng = np.random.default_rng(seed)  # the recipe of ShapesPreferencesConfig's docstring
    prompts = sample_prompts(rng, n)
    distractors = iter(sample_prompts(rng, n * (k - k // 2)))
    images = render([p if j < k // 2 else next(distractors) for p in prompts for j in range(k)], rng)
    scores = verify(images, [p for p in prompts for _ in range(k)]).score.reshape(n, k)
    pairs = preference_pairs(scores, rng, max_pairs_per_prompt=2)
    winners, losers = pairs.take(images.reshape(n, k, 32, 32, 3))
    assert len(records) == len(pairs) > n
    found_winners, found_losers = [], []
    for i, record in enumerate(records):
        assert record["label_0"] in (0.0, 1.0) and record["label_1"] == 1.0 - record["label_0"]
        assert record["caption"].decode() == prompts[pairs.prompt[i]].text
        pair = (record["image_0"], record["image_1"])
        winner, loser = pair if record["label_0"] == 1.0 else pair[::-1]
        found_winners.append(winner)
        found_losers.append(loser)
    np.testing.assert_array_equal(np.stack(found_winners), winners)
    np.testing.assert_array_equal(np.stack(found_losers), losers)
    captions = [r["caption"].decode() for r in records]
    assert verify(np.stack(found_winners), captions).score.all()
    assert not verify(np.stack(found_losers), captions).score.any()
    assert 0 < sum(r["label_0"] for r in records) < len(records)  # winners on both sides
    with pytest.raises(ValueError, match="samples_per_prompt=1"):
        ShapesPreferencesConfig(name="bad", samples_per_prompt=1)


@pytest.mark.parametrize("header,condition_size,needle", [
    (["image", "condition", "caption"], (4, 6), r"0\.png is 4x4 but its condition .*0c\.png is 4x6"),
    (["image", "cond", "caption"], (4, 4), r"lacks column\(s\) \['condition'\]"),
])
def test_control_pairs_csv_errors(tmp_path, header, condition_size, needle):
    """condition_size is (width, height)."""
    manual = tmp_path / "control"
    _save(manual / "0.png", np.zeros((4, 4, 3), np.uint8))
    _save(manual / "0c.png", np.zeros((*condition_size[::-1], 3), np.uint8))
    (manual / "train.csv").write_text(",".join(header) + "\n0.png,0c.png,a caption\n")
    with pytest.raises(ValueError, match=needle):
        _prepare(ControlPairs, tmp_path, manual)
