"""grain loaders: decoding, seeded order, host shards, resumable iterators (also through Orbax)."""

from __future__ import annotations

import io
import itertools

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jdpt.data.loading import decode_record, make_loader, make_stream
from jdpt.world.builders import ShapesPairs, ShapesPairsConfig
from jdpt.world.scenes import sample_pairs

# Few reader threads: the default 16 fight over 2 busy CI cores. Prefetching stays on.
READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)


def _indices(loader, batches=None) -> list[list[int]]:
    return [batch["index"].tolist() for batch in itertools.islice(iter(loader), batches)]


def _range_source(n: int) -> list[dict]:
    """Records ``{"index": i}``. grain's index shuffle walks cycles in a domain of at least
    2**16 indices: shuffling a few hundred records costs about a millisecond per record."""
    return [{"index": i} for i in range(n)]


def test_decode_record():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    record = decode_record({"image": buffer.getvalue(), "caption": "ünï".encode(),
                            "nested": {"label": 0.5, "array": np.arange(3)}})
    np.testing.assert_array_equal(record["image"], image)
    assert record["image"].dtype == np.uint8
    assert record["caption"] == "ünï"
    assert record["nested"]["label"] == 0.5 and record["nested"]["array"].tolist() == [0, 1, 2]


def test_tfds_source_batches(tmp_path):
    config = ShapesPairsConfig(name="n10", num_examples=10, seed=2)
    builder = ShapesPairs(data_dir=tmp_path, config=config)
    builder.download_and_prepare()
    prompts, images = sample_pairs(2, 10)
    decoded = builder.as_data_source("train")  # tfds decodes the PNGs with PIL
    raw = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})  # the loader does
    assert isinstance(raw[0]["image"], bytes)
    for source in (decoded, raw):
        loader = make_loader(source, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                             shard_index=0, shard_count=1)
        batches = list(loader)
        assert len(batches) == 2  # the last 2 records do not fill a batch
        for b, batch in enumerate(batches):
            assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 32, 32, 3)
            np.testing.assert_array_equal(batch["image"], images[4 * b: 4 * b + 4])
            assert batch["prompt"].tolist() == [p.text for p in prompts[4 * b: 4 * b + 4]]


def test_order_is_seeded_and_reshuffled_each_epoch():
    def order(seed, batches=None):
        return _indices(make_loader(_range_source(512), batch_size=64, seed=seed, num_epochs=3,
                                    shard_index=0, shard_count=1, read_options=READ), batches)

    first = order(3)
    assert first == order(3) and first[:2] != order(4, batches=2)
    epochs = np.array(first).reshape(3, 512)
    assert all(sorted(epoch) == list(range(512)) for epoch in epochs)  # each epoch is a permutation
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert sorted(epochs[0]) != epochs[0].tolist()


def test_transform_callable_and_grain():
    source = _range_source(8)
    double = make_loader(source, batch_size=4, seed=0, shuffle=False, num_epochs=1, shard_index=0,
                         shard_count=1, transform=lambda r: {"index": 2 * r["index"]})
    assert _indices(double) == [[0, 2, 4, 6], [8, 10, 12, 14]]

    class Odd(grain.transforms.Filter):
        def filter(self, element):
            return element["index"] % 2 == 1

    odd = make_loader(source, batch_size=2, seed=0, shuffle=False, num_epochs=1, shard_index=0,
                      shard_count=1, transform=Odd())
    assert _indices(odd) == [[1, 3], [5, 7]]


@pytest.mark.parametrize("n", [600, 603])
def test_two_shards_partition_the_data(n):
    shards = [sum(_indices(make_loader(_range_source(n), batch_size=100, seed=1, num_epochs=1, shard_index=i,
                                       shard_count=2, read_options=READ)), []) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 300  # equal steps per host: remainder dropped
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) <= set(range(n))
    if n == 600:
        assert sorted(shards[0] + shards[1]) == list(range(600))


def test_default_shards_by_jax_process():
    loader = make_loader(_range_source(12), batch_size=4, seed=0, num_epochs=1)
    assert sorted(sum(_indices(loader), [])) == list(range(12))  # one process: everything


@pytest.mark.parametrize("consumed", [2, 11])  # mid first epoch, and in the second
def test_restored_iterator_continues_exactly(consumed):
    def loader():  # shards of 500 records: 500 / 48 = 10.4 batches per epoch
        return make_loader(_range_source(1000), batch_size=48, seed=5, shard_index=1, shard_count=2,
                           read_options=READ)

    iterator = iter(loader())
    for _ in range(consumed):
        next(iterator)
    state = iterator.get_state()
    assert isinstance(state, bytes)
    expected = [next(iterator)["index"].tolist() for _ in range(6)]
    resumed = iter(loader())
    resumed.set_state(state)
    assert [next(resumed)["index"].tolist() for _ in range(6)] == expected
    fresh = iter(loader())
    assert [next(fresh)["index"].tolist() for _ in range(consumed + 6)][consumed:] == expected


def test_iterator_state_in_an_orbax_checkpoint(tmp_path):
    def loader():
        return make_loader(_range_source(1000), batch_size=16, seed=9, shard_index=0, shard_count=1,
                           read_options=READ)

    iterator = iter(loader())
    for _ in range(4):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(
            step=ocp.args.JsonSave({"step": 4}), data=grain.checkpoint.CheckpointSave(iterator)))
        expected = [next(iterator)["index"].tolist() for _ in range(5)]  # advance while saving
        manager.wait_until_finished()
        resumed = iter(loader())
        restored = manager.restore(4, args=ocp.args.Composite(
            step=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(resumed)))
    assert restored.step == {"step": 4}
    assert [next(resumed)["index"].tolist() for _ in range(5)] == expected


@pytest.mark.parametrize("kwargs,needle", [
    (dict(shard_index=0), "shard_index=0, shard_count=None"),
    (dict(shard_index=2, shard_count=2), r"shard_index=2 is outside \[0, shard_count=2\)"),
    (dict(batch_size=0), "batch_size=0"),
])
def test_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        make_loader(_range_source(4), **{"batch_size": 2, "seed": 0, **kwargs})


def _stream_batch(i: int) -> dict:
    return {"x": np.random.default_rng([3, i]).normal(size=2), "i": np.int64(i)}


def test_stream_makes_batch_i_and_resumes_in_a_new_process_state():
    """make_stream's element i is make_batch(i), in order, prefetched by threads; a saved state
    restores into a stream built anew (its source's repr is what grain compares)."""
    iterator = iter(make_stream(_stream_batch, 20))
    first = [next(iterator) for _ in range(5)]
    assert [int(b["i"]) for b in first] == list(range(5))
    np.testing.assert_array_equal(first[3]["x"], _stream_batch(3)["x"])
    state = iterator.get_state()
    expected = [int(next(iterator)["i"]) for _ in range(4)]
    resumed = iter(make_stream(_stream_batch, 20))
    resumed.set_state(state)
    assert [int(next(resumed)["i"]) for _ in range(4)] == expected == [5, 6, 7, 8]
    assert len(list(make_stream(_stream_batch, 3))) == 3
    with pytest.raises(ValueError, match="num_batches=0"):
        make_stream(_stream_batch, 0)
