"""The resumable train loop: a step function, a grain loader and an Orbax checkpoint directory.

One loop runs every kind of training: pretraining and offline post-training (a
:func:`jdpt.parallel.make_train_step` step on a data loader), online post-training (a rollout
phase and an update phase in one step, :func:`jdpt.train.online.make_online_step`, on a prompt
loader) and, later, distillation.

:func:`fit` runs ``state, metrics = step(state, batch, jax.random.fold_in(key, i))`` for steps
``i = 0, 1, ...`` (``step`` from :func:`jdpt.parallel.make_train_step` or ``pmap_step``) and keeps
in ``checkpoint_dir``, every ``save_every`` steps and at the end, an Orbax checkpoint of

- ``state/``: the trainable part of the :class:`~jdpt.parallel.TrainState` (``step``,
  ``params``, ``opt_state`` and the objective's ``aux`` state: an old policy, EMA weights, stat
  trackers, a value net and its optimizer); the frozen weights are inputs of the run, not outputs;
- ``data/``: the grain iterator's position, one file per JAX process;
- ``key/``: the run's base RNG key (implementation name and key data).

Saving is asynchronous (the arrays are copied to host memory, then written while training goes
on) and atomic (written to a temporary folder, renamed when complete), and keeps the last
``keep`` checkpoints. Calling :func:`fit` again with the same ``checkpoint_dir`` restores the
latest checkpoint straight into the shardings of the ``state`` it is given, moves the loader to
the batch after the checkpoint and drops the metric lines logged after it: the finished run is
bit-identical to one that was never interrupted. A run that has reached ``num_steps`` returns at
once.

Unreadable checkpoints: before restoring a step, :func:`fit` checks that its folder is complete
(Orbax's commit marker ``commit_success.txt`` and the three items above) and that the state's
metadata and this host's iterator position parse (with several processes, all hosts agree on
the outcome before the collective restore), then restores it; a missing, truncated or garbled
file makes a read fail. Such a step is reported (a warning on the ``jdpt.train.fit`` logger
naming the step and the reason) and the next older one is tried; once one restores, the
unreadable newer folders are renamed to
``<step>.unreadable-<unix time>`` (kept for inspection, never overwritten by the resumed run's
saves). When checkpoints exist but none is readable, :func:`fit` raises instead of starting
over. A readable checkpoint of another run (other model, optimizer or key) is an error, not a
reason to fall back.

NaN guard: the metrics of every update (``loss``, ``grad_norm`` and the objective's) are
fetched and checked at each log step and before each checkpoint; the first update with a NaN
or infinite value raises :class:`NonFiniteMetrics` naming it and the metrics, and no
checkpoint of a state after it is written (checking only there keeps the device busy between
checks: a NaN is caught at most ``log_every`` updates late, but always named exactly).

Interruptions:

- an exception (in the step, the loader or a hook) propagates after the checkpoint being saved,
  if any, is complete; the last complete checkpoint is the resume point. A process killed hard
  (SIGKILL, power loss) leaves at worst an unfinished temporary folder, which Orbax ignores and
  removes on the next start.
- SIGTERM (a Cloud TPU / GKE / Slurm preemption notice) makes :func:`fit` finish the current
  step, save a checkpoint at it, wait for the write and raise :class:`Preempted`. On one process
  :func:`fit` installs its own SIGTERM handler (main thread only; the previous handler is put
  back on return). On several, JAX's preemption service (on by default with
  ``jax.distributed``) receives the signal and every host stops at the same step
  (``multihost_utils.reached_preemption_sync_point``).

Metrics: every ``log_every`` steps one JSON line ``{"step", "time", <metric>: value...}``
(``step``: updates done; ``time``: Unix time) is appended to ``metrics_path`` (default
``checkpoint_dir/metrics.jsonl``), written to TensorBoard when ``tensorboard_dir`` is set (needs
``pip install tensorboardX``) and shown on a tqdm bar with the step time and examples/s. Only
process 0 writes logs and draws the bar.

Multi-host launch (Cloud TPU pod slice). Every host runs the same program: JAX assembles the
global batch from each host's rows (:func:`jdpt.parallel.shard_batch`), each host's loader reads
its own shard of the records (``make_loader``'s default ``ShardByJaxProcess``), Orbax writes each
host's array shards and grain each host's iterator position into the shared ``checkpoint_dir``::

    # train.py
    import jax, optax
    from jdpt.data.loading import make_loader
    from jdpt.parallel import make_mesh, make_train_step
    from jdpt.train import Preempted, fit, initialize_distributed

    def main():
        initialize_distributed()  # first: before any other JAX call; no-op on one machine
        mesh = make_mesh(data=-1)  # every device of every host
        model, objective, source = ...
        init_state, step = make_train_step(objective, optax.adamw(1e-4), mesh, model=model)
        loader = make_loader(source, batch_size=32, seed=0)  # 32 rows per host
        try:
            fit(step, init_state(model), loader, key=jax.random.key(0), num_steps=100_000,
                checkpoint_dir="gs://my-bucket/run1", metrics_path="/tmp/run1.jsonl", mesh=mesh)
        except Preempted:
            pass  # the checkpoint is saved; run the same command again to resume

    if __name__ == "__main__":
        main()

Create the slice, install the same code on every worker, launch on all of them at once::

    gcloud compute tpus tpu-vm create my-pod --zone=us-central2-b \\
        --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
    gcloud compute tpus tpu-vm scp --recurse . my-pod:~/job --zone=us-central2-b --worker=all
    gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all \\
        --command="cd ~/job && pip install -e . 'jax[tpu]' && python train.py"

``checkpoint_dir`` must be storage every host sees (a ``gs://`` bucket, NFS); ``metrics_path``
is written by process 0 alone and is best a local file. After a preemption (or any stop), the
same ``ssh --worker=all`` command resumes the run. On GPU clusters the same program runs under
``srun`` (Slurm) or ``mpirun`` (Open MPI), one process per host: :func:`initialize_distributed`
detects both.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from jdpt.parallel.mesh import shard_batch
from jdpt.parallel.step import Metrics, Step, TrainState

Hook = Callable[[int, TrainState, Metrics], None]

logger = logging.getLogger(__name__)

# Orbax (>= 0.11) writes this file into a step folder as the last act of a save; a folder
# without it was never completed. Every checkpoint of fit() has these items.
_COMMIT_MARKER = "commit_success.txt"
_ITEMS = ("state", "data", "key")

# Set by the cluster launchers jax.distributed.initialize() auto-detects: an explicit
# coordinator, GKE TPU workers, Slurm job steps (srun), Open MPI (mpirun).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "TPU_PROCESS_ADDRESSES_PATH", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri")
# TPU chips of a Cloud TPU VM (v2-v4: /dev/accel*, v5e and later: /dev/vfio/<n>).
_TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")


class Preempted(Exception):
    """:func:`fit` received a preemption notice (SIGTERM) and stopped after saving a checkpoint.

    Attributes:
        step: the updates done; the checkpoint holds the state after them.
        checkpoint_dir: where it is; :func:`fit` with the same directory resumes from it.
    """

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(f"preempted (SIGTERM) after step {step}; the checkpoint is saved in "
                         f"{checkpoint_dir}: call fit again with the same checkpoint_dir to resume")
        self.step = step
        self.checkpoint_dir = checkpoint_dir


class NonFiniteMetrics(ValueError):
    """A NaN or infinite loss/metric: :func:`fit` stopped without checkpointing that state.

    Attributes:
        step: the update (1-based, as in the metrics log) whose metrics are not finite.
        metrics: their names, e.g. ``["loss", "grad_norm"]``.
        checkpoint_dir: the run's directory; its newest checkpoint is from before ``step``.
    """

    def __init__(self, step: int, values: dict[str, Any], checkpoint_dir: str):
        bad = {name: value for name, value in values.items() if not _finite(value)}
        shown = ", ".join(f"{name}={_summary(value)}" for name, value in bad.items())
        super().__init__(
            f"step {step}: metric(s) {list(bad)} not finite ({shown}); training stopped and this state "
            f"was not checkpointed. The checkpoints in {checkpoint_dir} are from before step {step}: "
            "find the cause (learning rate, loss scale, bad batch), then resume from them")
        self.step = step
        self.metrics = list(bad)
        self.checkpoint_dir = checkpoint_dir


def _finite(value: Any) -> bool:
    array = np.asarray(value)
    return not np.issubdtype(array.dtype, np.inexact) or bool(np.isfinite(array).all())


def _summary(value: Any) -> str:
    array = np.asarray(value)
    if array.ndim == 0:
        return str(array.item())
    return f"{(~np.isfinite(array)).sum()} of {array.size} entries NaN/inf"


def initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when this process is one of a multi-process job.

    Call it first, before anything else touches JAX. It initializes when a cluster launcher's
    variables are set (``JAX_COORDINATOR_ADDRESS``, GKE's ``TPU_WORKER_HOSTNAMES``, Slurm's
    ``srun``, Open MPI's ``mpirun``) or TPU chips are attached (a Cloud TPU VM: JAX reads the
    slice's workers from its metadata; a one-host slice becomes a job of one process). On a
    laptop, a workstation or in CI it does nothing.

    Returns:
        True when the distributed runtime is (now) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    if not (any(name in os.environ for name in _CLUSTER_ENV)
            or any(glob.glob(pattern) for pattern in _TPU_DEVICES)):
        return False
    jax.distributed.initialize()
    return True


@contextlib.contextmanager
def _sigterm_notice():
    """Yields ``received() -> bool``: whether SIGTERM arrived since entering (one process only)."""
    received = threading.Event()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield received.is_set  # JAX's preemption service owns SIGTERM; threads cannot take it
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def _typed_key(key: jax.Array) -> jax.Array:
    """``key`` as a typed key (raw ``uint32`` keys from ``jax.random.PRNGKey`` are wrapped)."""
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _key_record(key: jax.Array) -> dict:
    return {"impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}


def _abstract(tree: Any) -> Any:
    """``ShapeDtypeStruct``s with each array's sharding: Orbax restores straight into them."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _shapes(tree: Any) -> dict[str, tuple]:
    """``{"params.fc1.kernel.value": (shape, dtype)}``: the names Orbax stores arrays under."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): (tuple(x.shape), np.dtype(x.dtype))
            for path, x in leaves}


def _check_fits(stored: Any, expected: Any, where: str) -> None:
    """Raise unless the checkpointed state ``stored`` (Orbax metadata) has ``expected``'s arrays."""
    have, want = _shapes(stored), _shapes(expected)
    missing = [name for name in want if name not in have]  # in the state's order: params first
    unexpected = [name for name in have if name not in want]
    differ = [f"{name}: {have[name]} vs {want[name]}" for name in want
              if name in have and have[name] != want[name]]
    problems = [f"{what} {names[:5]}" for what, names in (
        ("missing", missing), ("unexpected", unexpected), ("shape/dtype (stored vs given)", differ)) if names]
    if problems:
        raise ValueError(
            f"{where} holds a different train state than the one given: {'; '.join(problems)}. "
            "Resume with the model, trainable filter and optimizer that wrote it, or pass a new "
            "checkpoint_dir to start a fresh run"
        )


class _Unreadable(Exception):
    """A checkpoint step that cannot be restored; the message says why."""


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _inspect_step(path) -> tuple[str | None, Any]:
    """``(why this process cannot restore the step folder path, or None; the state's Orbax
    metadata)`` from the files it reads alone: no collectives, so that hosts can agree on the
    outcome before the (collective) restore."""
    if not (path / _COMMIT_MARKER).exists():
        return f"no {_COMMIT_MARKER} (Orbax's commit marker): the save never finished", None
    missing = [item for item in _ITEMS if not (path / item).is_dir()]
    if missing:
        return f"item folder(s) {missing} missing", None
    handler = ocp.StandardCheckpointHandler()
    try:
        stored = handler.metadata(path / "state")
    except Exception as error:  # any failure to read or parse the files means: unusable
        return f"state metadata unreadable ({_reason(error)})", None
    finally:
        handler.close()
    # grain's checkpoint handler keeps one iterator position per process under this name.
    position = path / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
        json.loads(position.read_text())
    except Exception as error:
        return f"iterator state {position.name} unreadable ({_reason(error)})", None
    return None, stored


def _restore_step(manager: ocp.CheckpointManager, step: int, stored: Any, train: TrainState, iterator,
                  key: jax.Array, directory: str) -> TrainState:
    """The train state of checkpoint ``step`` (the iterator moved to its position); ``stored``:
    the state's metadata from :func:`_inspect_step`.

    Raises:
        _Unreadable: a file in it cannot be read or decoded.
        ValueError: it is readable but holds another run's state or key.
    """
    where = f"checkpoint_dir {directory} (step {step})"
    _check_fits(stored.tree, train, where)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(train)),
            data=grain.checkpoint.CheckpointRestore(iterator), key=ocp.args.JsonRestore()))
    except Exception as error:
        raise _Unreadable(f"restore failed ({_reason(error)})") from error
    if restored.key != _key_record(key):
        raise ValueError(f"{where} was trained with key {restored.key}, not the given "
                         f"{_key_record(key)}: pass the run's key, or a new checkpoint_dir")
    return restored.state


def _failed_processes(ok: bool) -> list[int]:
    """The JAX processes where ``ok`` is False (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [] if ok else [0]
    flags = np.asarray(multihost_utils.process_allgather(np.asarray(ok))).reshape(-1)
    return [int(i) for i in np.flatnonzero(~flags)]


def _resume(manager: ocp.CheckpointManager, train: TrainState, iterator, key: jax.Array,
            directory: str) -> tuple[int, TrainState]:
    """``(step, state)`` of the newest readable checkpoint, ``(0, train)`` when there is none.

    Unreadable newer steps are logged (step and reason) and renamed to
    ``<step>.unreadable-<unix time>`` (kept for inspection, out of Orbax's sight, so that the
    resumed run's saves of those steps do not meet them).
    """
    bad: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        reason, stored = _inspect_step(manager.directory / str(step))
        failed = _failed_processes(reason is None)  # every host must resume from the same step
        if not failed:
            try:  # the rest is read from files all hosts share: they fail alike
                state = _restore_step(manager, step, stored, train, iterator, key, directory)
            except _Unreadable as error:
                reason = str(error)
        elif reason is None:
            reason = f"unreadable on process(es) {failed}"
        if reason is not None:
            logger.warning("checkpoint step %d in %s is unreadable: %s; trying the previous step",
                           step, directory, reason)
            bad.append((step, reason))
            continue
        if bad:
            stamp = int(time.time())
            if jax.process_index() == 0:
                for unreadable, _ in bad:
                    source = manager.directory / str(unreadable)
                    source.rename(source.parent / f"{unreadable}.unreadable-{stamp}")
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jdpt.train.fit: unreadable steps moved")
            manager.reload()
            logger.warning("resuming from step %d in %s; unreadable step(s) %s moved to "
                           "<step>.unreadable-%d", step, directory, [s for s, _ in bad], stamp)
        return step, state
    if bad:
        raise ValueError(
            f"checkpoint_dir {directory} holds checkpoints but none is readable: "
            + "; ".join(f"step {step}: {reason}" for step, reason in bad)
            + ". Move those step folders away to start afresh there, or pass a new checkpoint_dir")
    return 0, train


class _Log:
    """The JSONL metrics log (cut back to ``start`` on resume) and the optional TensorBoard
    writer; both written by process 0 only."""

    def __init__(self, path: Path, tensorboard_dir: str | Path | None, start: int):
        self.writer = self.file = None
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as error:
                raise ImportError(f"tensorboard_dir={str(tensorboard_dir)!r} needs the tensorboardX package: "
                                  "pip install tensorboardX (or pass tensorboard_dir=None)") from error
        if jax.process_index() != 0:
            return
        if tensorboard_dir is not None:  # events of steps after the resume point are discarded
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=start + 1 if start else None)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] > start:
                        break
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
                kept.append(line + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(kept))
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("step", "time") and np.ndim(value) == 0:
                    self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def fit(
    step: Step,
    state: TrainState,
    loader: Iterable,
    *,
    key: jax.Array,
    num_steps: int,
    checkpoint_dir: str | os.PathLike,
    save_every: int = 1000,
    keep: int = 3,
    log_every: int = 10,
    metrics_path: str | os.PathLike | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    hooks: Sequence[Hook] = (),
) -> tuple[TrainState, list[dict]]:
    """Train ``state`` with ``step`` on ``loader``'s batches up to ``num_steps`` updates,
    resuming from ``checkpoint_dir`` when it holds a checkpoint (module docstring).

    Args:
        step: ``step(state, batch, key) -> (state, metrics)``, e.g. from
            :func:`jdpt.parallel.make_train_step`; it may donate ``state``.
        state: the initial state (``init_state(model)``). On resume only its frozen weights and
            the shardings of its arrays are used: the checkpoint is restored into them.
        loader: a ``grain.DataLoader`` (:func:`jdpt.data.loading.make_loader`) or grain
            ``IterDataset``: ``iter(loader)`` must be checkpointable. Batches are pytrees of
            arrays ``[B_local, ...]`` (this host's rows). A loader that runs out ends the run
            early (with a checkpoint).
        key: the run's base key; update ``i`` (0-based: ``state.step`` before it) gets
            ``jax.random.fold_in(key, i)``. A resumed run must pass the key it started with.
        num_steps: total updates of the run, counting those before a resume.
        checkpoint_dir: the run's directory (local or any path Orbax writes, e.g. ``gs://``).
        save_every: checkpoint every this many updates (and after the last one).
        keep: how many of the newest checkpoints to keep.
        log_every: log metrics every this many updates (and after the last one).
        metrics_path: the JSONL log; default ``checkpoint_dir/metrics.jsonl``. A local file.
        tensorboard_dir: also write the scalar metrics there (needs ``tensorboardX``).
        mesh: place each batch with :func:`jdpt.parallel.shard_batch` on this mesh (required
            with several processes); None passes the host batch to ``step`` as it is.
        progress: show a tqdm progress bar.
        hooks: ``hook(step, state, metrics)`` called after each update (and its checkpoint, if
            one is due) with the number of updates done, the state and the (device) metrics. A
            hook returning True ends the run there (checkpointed), e.g. a wall-clock budget.

    Returns:
        The final state and the records logged by this call (``time`` aside, the lines the
        JSONL log gained).

    Raises:
        Preempted: on SIGTERM, after saving a checkpoint at the current step.
        NonFiniteMetrics: an update gave a NaN/inf metric (nothing after it is checkpointed).
        ValueError: ``checkpoint_dir`` holds a different state or key (use a new directory),
            or checkpoints of which none is readable.
    """
    for name, value in (("num_steps", num_steps), ("save_every", save_every), ("keep", keep),
                        ("log_every", log_every)):
        if value < 1:
            raise ValueError(f"{name}={value}: pass a positive number")
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"{jax.process_count()} processes: pass mesh= so that every host's batch "
                         "becomes one global array (jdpt.parallel.shard_batch)")
    if metrics_path is None and "://" in os.fspath(checkpoint_dir):
        raise ValueError(f"checkpoint_dir={os.fspath(checkpoint_dir)!r} is not a local folder: "
                         "pass metrics_path= (a local file) for the metrics log")
    key = _typed_key(key)
    directory = os.fspath(checkpoint_dir)
    iterator = iter(loader)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)

    pending: list[tuple[int, Metrics]] = []  # metrics (on device) not yet checked for NaN/inf

    def check() -> dict[str, Any]:
        """Fetch the pending metrics; raise :class:`NonFiniteMetrics` at the first step with a
        NaN/inf; return the newest step's values."""
        fetched = jax.device_get([metrics for _, metrics in pending])
        for (done, _), values in zip(pending, fetched, strict=True):
            if not all(_finite(value) for value in values.values()):
                raise NonFiniteMetrics(done, values, directory)
        pending.clear()
        return fetched[-1]

    def save(done: int, train: TrainState) -> None:
        if pending:
            check()  # never checkpoint a state reached through a NaN/inf update
        manager.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(train), data=grain.checkpoint.CheckpointSave(iterator),
            key=ocp.args.JsonSave(_key_record(key))))

    # SIGTERM stays handled until the manager has closed (written its last checkpoint).
    with (_sigterm_notice() as sigterm, ocp.CheckpointManager(directory, options=options) as manager):
        frozen = state.frozen
        start, train = _resume(manager, state.replace(frozen=None), iterator, key, directory)
        state = train.replace(frozen=frozen)
        log = _Log(Path(metrics_path or Path(directory) / "metrics.jsonl"), tensorboard_dir, start)
        bar = tqdm(total=num_steps, initial=start, unit="step",
                   disable=not progress or jax.process_index() != 0)
        history, done, saved = [], start, start
        last_time, last_done = time.perf_counter(), start
        try:
            for done in range(start + 1, num_steps + 1):
                batch = next(iterator, None)
                if batch is None:  # the loader ran out
                    done -= 1
                    break
                examples = jax.tree.leaves(batch)[0].shape[0] * jax.process_count()
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                state, metrics = step(state, batch, jax.random.fold_in(key, done - 1))
                pending.append((done, metrics))
                if done % log_every == 0 or done == num_steps:
                    values = {name: np.asarray(value).tolist() for name, value in check().items()}
                    record = {"step": done, "time": time.time(), **values}
                    log.write(record)
                    history.append(record)
                    now = time.perf_counter()
                    step_time = (now - last_time) / (done - last_done)
                    bar.set_postfix({**({"loss": values["loss"]} if "loss" in values else {}),
                                     "s/step": f"{step_time:.3g}",
                                     "examples/s": f"{examples / step_time:.4g}"})
                    last_time, last_done = now, done
                bar.update()
                if done % save_every == 0 or done == num_steps:
                    save(done, state.replace(frozen=None))
                    saved = done
                stop = [bool(hook(done, state, metrics)) for hook in hooks]
                if sigterm() or manager.reached_preemption(done):
                    if saved != done:
                        save(done, state.replace(frozen=None))
                    raise Preempted(done, directory)  # the manager waits for the write on exit
                if any(stop):
                    break
            if saved != done:
                save(done, state.replace(frozen=None))
        finally:
            bar.close()
            log.close()
    return state, history
