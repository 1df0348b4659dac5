"""grain loaders: shuffled, decoded, batched, per-host sharded and checkpointable; and streams of
batches made on the fly (:func:`make_stream`).

:func:`make_loader` turns any random-access source (``len`` + ``__getitem__``: a tfds
``as_data_source`` of :mod:`jdpt.data.builders`, a ``grain.sources.ArrayRecordDataSource``, a list
of dicts) into a ``grain.DataLoader``. ``iter(loader)`` gives a ``grain.DataLoaderIterator`` whose
``get_state()`` is JSON ``bytes`` and ``set_state(state)`` resumes at exactly the next batch.

Checkpointing with Orbax: grain ships the handler (``grain.checkpoint.CheckpointHandler``,
registered with Orbax through ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``, present
in grain 0.2.18 + orbax-checkpoint 0.12.8). It writes one ``process_<i>-of-<n>.json`` per JAX
process, so every host restores its own shard's position; put it beside the train state::

    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))  # iterator = iter(same loader)
"""

from __future__ import annotations

import io
from collections.abc import Callable

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # no UTF-8 text starts with byte 0x89


def _decode_leaf(value):
    if isinstance(value, bytes):
        if value.startswith(_PNG_SIGNATURE):
            with Image.open(io.BytesIO(value)) as image:
                return np.asarray(image)
        return value.decode("utf-8")
    return value


def decode_record(record):
    """A record with PNG bytes decoded to uint8 ``[H, W, C]`` and other bytes (tfds text) to
    ``str``; other leaves of the (nested) record are returned unchanged."""
    return jax.tree.map(_decode_leaf, record)


class _Decode(grain.transforms.Map):
    def map(self, element):
        return decode_record(element)


class _Call(grain.transforms.Map):
    def __init__(self, fn: Callable):
        self.fn = fn

    def map(self, element):
        return self.fn(element)


def make_loader(source, *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, transform=None, shard_index: int | None = None,
                shard_count: int | None = None, drop_remainder: bool = True,
                worker_count: int = 0, read_options: grain.ReadOptions | None = None) -> grain.DataLoader:
    """A grain loader of batches of decoded records from ``source``.

    The pipeline: split the records into ``shard_count`` contiguous shards and keep shard
    ``shard_index``; shuffle within the shard (reshuffled every epoch, from ``seed``); read;
    :func:`decode_record`; ``transform``; stack ``batch_size`` records leaf by leaf (images
    ``[B, H, W, C]`` uint8, text ``[B]`` str): records must have equal shapes by then, so give
    sources of mixed image sizes a ``transform`` that crops or resizes.

    Args:
        source: random access records (``len(source)``, ``source[i]``).
        batch_size: records per batch on this host.
        seed: shuffle seed (a non-negative 32-bit int); also seeds ``grain.transforms.RandomMap``.
        shuffle: False reads each shard in order.
        num_epochs: passes over the data; None repeats forever.
        transform: a callable ``record -> record`` or a grain transform (``Map``, ``RandomMap``,
            ``Filter``...), applied after decoding.
        shard_index, shard_count: this host's shard; both None (default) shard by JAX process
            (``grain.sharding.ShardByJaxProcess``, read when the loader is made, after
            ``jax.distributed.initialize()``).
        drop_remainder: drop the records that do not divide evenly into shards and the last
            partial batch, so every host runs the same number of steps.
        worker_count: child processes reading and decoding in parallel (0: in this process).
            Each worker batches its own share of the records, so which records share a batch
            depends on ``worker_count``; a saved state restores with the same count.
            ``transform`` must then be picklable (a module-level function or class).
        read_options: reader threads and prefetch buffer; None is grain's default
            (``grain.ReadOptions()``: 16 threads, 500 records ahead).

    Returns:
        ``grain.DataLoader``; ``iter(loader)`` is the checkpointable iterator.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: pass a positive number of records per batch")
    if (shard_index is None) != (shard_count is None):
        raise ValueError(f"shard_index={shard_index}, shard_count={shard_count}: pass both, or "
                         "neither to shard by JAX process")
    if shard_index is None:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    elif not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is outside [0, shard_count={shard_count})")
    else:
        shard = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder)
    sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=shuffle,
                                          num_epochs=num_epochs, seed=seed)
    if worker_count and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain 0.2.18 workers read an absl flag (google/grain#1355)
    operations = [_Decode()]
    if transform is not None:
        is_grain = isinstance(transform, grain.transforms.Transformation)
        operations.append(transform if is_grain else _Call(transform))
    operations.append(grain.transforms.Batch(batch_size, drop_remainder=drop_remainder))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count, shard_options=shard, read_options=read_options)


class _Indices:
    """The random-access source ``0, 1, ..., n - 1``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __repr__(self) -> str:  # grain's checkpoints record it: stable across processes
        return f"range({self.n})"


def make_stream(make_batch: Callable[[int], dict], num_batches: int, *,
                read_options: grain.ReadOptions | None = None) -> grain.DataLoader:
    """A grain loader whose ``i``-th element is the batch ``make_batch(i)``: data made on the fly
    (rendered scenes, prompts drawn from a grammar) with a checkpointable position.

    ``make_batch`` must be a deterministic function of ``i`` (seed its randomness with ``i``), so
    a restored iterator continues with exactly the batches an uninterrupted run would have seen;
    grain's reader threads (``read_options``, default 4 threads, 8 batches ahead) make the next
    batches while the current step runs. Every process makes the same batches (no sharding).
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches}: pass a positive number of batches")
    sampler = grain.samplers.IndexSampler(num_batches, shard_options=grain.sharding.NoSharding(), shuffle=False,
                                          num_epochs=1, seed=0)
    options = read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
    return grain.DataLoader(data_source=_Indices(num_batches), sampler=sampler, operations=[_Call(make_batch)],
                            read_options=options)
