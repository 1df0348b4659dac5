"""fit: interrupted (exception, SIGTERM) and resumed runs equal an uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import shutil
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.experimental import multihost_utils

from jdpt.data.loading import make_loader
from jdpt.models.layers import dense
from jdpt.parallel import make_mesh, make_train_step
from jdpt.train import NonFiniteMetrics, Preempted, fit, initialize_distributed

STEPS, SAVE_EVERY, SEED = 10, 3, 7


class MLP(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.fc1 = dense(4, width, ("embed", "mlp"), rngs=rngs)
        self.fc2 = dense(width, 2, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class NoisyRegression:
    """MSE on inputs jittered by the key: the loss depends on the batch and on the key."""

    def loss(self, params, frozen, batch, key):
        x = batch["x"] + 0.1 * jax.random.normal(key, batch["x"].shape)
        loss = jnp.mean((frozen.model(params)(x) - batch["y"]) ** 2)
        return loss, {"x_mean": batch["x"].mean()}


def _loader(num_epochs=None):
    """64 records, 8 per batch: the 10 steps cross an epoch (reshuffled) boundary."""
    rng = np.random.default_rng(0)
    records = [{"x": rng.normal(size=4).astype(np.float32), "y": rng.normal(size=2).astype(np.float32)}
               for _ in range(64)]
    return make_loader(records, batch_size=8, seed=3, num_epochs=num_epochs,
                       read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=4, fsdp=2)


def _trainer(mesh, width=16, optimizer=None):
    model = MLP(width, nnx.Rngs(0))
    init, step = make_train_step(NoisyRegression(), optimizer or optax.adam(1e-2), mesh, model=model,
                                 rules="fsdp")
    return lambda: init(model), step


@pytest.fixture(scope="module")
def trainer(mesh):
    return _trainer(mesh)


def _fit(trainer, mesh, directory, **kw):
    init, step = trainer
    kw = {"num_steps": STEPS, "save_every": SAVE_EVERY, "log_every": 1, "progress": False, **kw}
    return fit(step, init(), kw.pop("loader", None) or _loader(), key=jax.random.key(SEED),
               checkpoint_dir=directory, mesh=mesh, **kw)


def _lines(directory) -> list[dict]:
    """The metrics log without its wall-clock times."""
    text = (directory / "metrics.jsonl").read_text()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in text.splitlines()]


def _steps(directory) -> list[int]:
    with ocp.CheckpointManager(directory) as manager:
        return list(manager.all_steps())


def _assert_same_params(state, ref):
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _fail_at(when: int, action):
    def hook(done, state, metrics):
        if done == when:
            action()
    return hook


@pytest.fixture(scope="module")
def uninterrupted(trainer, mesh, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    state, history = _fit(trainer, mesh, directory)
    return state, history, _lines(directory)


def test_uninterrupted_run(uninterrupted):
    state, history, lines = uninterrupted
    assert int(state.step) == STEPS
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert [{k: v for k, v in h.items() if k != "time"} for h in history] == lines
    assert lines[-1]["loss"] < lines[0]["loss"] and len({line["x_mean"] for line in lines}) == STEPS
    assert {"grad_norm", "loss", "x_mean"} <= lines[0].keys()
    q = state.params["fc1"]["kernel"].get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_exception_then_resume_equals_uninterrupted(trainer, mesh, uninterrupted, tmp_path):
    def crash():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # after step 5: the checkpoint of step 3 is the last
        _fit(trainer, mesh, tmp_path, hooks=[_fail_at(5, crash)])
    assert _steps(tmp_path) == [3]
    assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3, 4, 5]
    state, history = _fit(trainer, mesh, tmp_path)
    ref_state, _, ref_lines = uninterrupted
    assert [h["step"] for h in history] == list(range(4, STEPS + 1))
    assert _lines(tmp_path) == ref_lines  # steps 4-5 were logged again, not twice
    _assert_same_params(state, ref_state)
    assert int(state.step) == STEPS
    kernel, ref_kernel = (s.params["fc1"]["kernel"].get_value() for s in (state, ref_state))
    assert kernel.sharding == ref_kernel.sharding  # restored into the given state's shardings


def test_sigterm_saves_then_resume_equals_uninterrupted(trainer, mesh, uninterrupted, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="after step 4.*same checkpoint_dir") as preempted:
        _fit(trainer, mesh, tmp_path, hooks=[_fail_at(4, lambda: os.kill(os.getpid(), signal.SIGTERM))])
    assert preempted.value.step == 4
    assert signal.getsignal(signal.SIGTERM) is before  # handler put back
    assert _steps(tmp_path) == [3, 4]
    state, _ = _fit(trainer, mesh, tmp_path)
    _assert_same_params(state, uninterrupted[0])
    assert _lines(tmp_path) == uninterrupted[2]


def test_keep_async_done_tmp_cleanup_and_finished_run(trainer, mesh, tmp_path):
    stale = tmp_path / "2.orbax-checkpoint-tmp-1700000000"  # what a SIGKILL mid-save leaves
    stale.mkdir(parents=True)
    state, _ = _fit(trainer, mesh, tmp_path, num_steps=5, save_every=1, keep=2)
    assert _steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5", "metrics.jsonl"]  # all committed
    with ocp.CheckpointManager(tmp_path) as manager:
        assert int(manager.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
                   .state["step"]) == 5
    again, history = _fit(trainer, mesh, tmp_path, num_steps=5)  # finished: nothing to do
    assert history == [] and int(again.step) == 5
    _assert_same_params(again, state)


def test_loader_running_out_ends_the_run(trainer, mesh, tmp_path, capsys):
    state, history = _fit(trainer, mesh, tmp_path, num_steps=20, loader=_loader(num_epochs=1),
                          log_every=5, progress=True)
    assert int(state.step) == 8 and [h["step"] for h in history] == [5]
    bar = capsys.readouterr().err
    assert "8/20" in bar and "examples/s" in bar
    assert _steps(tmp_path) == [3, 6, 8]


def _truncate_arrays(step_dir: Path):
    """Cut every OCDBT data file of the train state in half (a copy or write cut short)."""
    for path in (step_dir / "state" / "d").iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {  # what a checkpoint of this run looks like after each kind of damage
    "commit marker missing": (lambda d: (d / "commit_success.txt").unlink(), "no commit_success.txt"),
    "array files truncated": (_truncate_arrays, "state metadata unreadable .*OCDBT"),
    "iterator state garbled": (lambda d: (d / "data" / "process_0-of-1.json").write_text('{"next_ind'),
                               r"iterator state process_0-of-1\.json unreadable \(JSONDecodeError"),
    "state item deleted": (lambda d: shutil.rmtree(d / "state"), r"item folder\(s\) \['state'\] missing"),
}


# A failed read of truncated OCDBT files can leave a tensorstore callback that fires after
# Orbax's event loop closed ("Event loop is closed", ignored by Python): harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_unreadable_newest_step_falls_back_to_the_previous(trainer, mesh, uninterrupted, tmp_path, caplog,
                                                           damage):
    corrupt, reason = CORRUPTIONS[damage]
    _fit(trainer, mesh, tmp_path, num_steps=6)  # checkpoints 3 and 6
    corrupt(tmp_path / "6")
    with caplog.at_level(logging.WARNING, logger="jdpt.train.fit"):
        state, history = _fit(trainer, mesh, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.name == "jdpt.train.fit"]
    assert len(warnings) == 2, warnings
    assert re.search(rf"checkpoint step 6 in {tmp_path} is unreadable: {reason}.*previous step", warnings[0])
    assert re.search(r"resuming from step 3 .*unreadable step\(s\) \[6\] moved", warnings[1])
    assert [h["step"] for h in history] == list(range(4, STEPS + 1))  # resumed after step 3
    _assert_same_params(state, uninterrupted[0])
    assert _lines(tmp_path) == uninterrupted[2]
    assert len(list(tmp_path.glob("6.unreadable-*"))) == 1  # kept for inspection, not overwritten
    assert _steps(tmp_path) == [6, 9, 10]  # keep=3 of the resumed run's saves 6, 9, 10


def test_no_readable_checkpoint_is_an_error(trainer, mesh, tmp_path):
    _fit(trainer, mesh, tmp_path, num_steps=4)  # checkpoints 3 and 4
    (tmp_path / "4" / "key" / "metadata").write_text("[1, 2")
    (tmp_path / "3" / "commit_success.txt").unlink()
    with pytest.raises(ValueError, match=r"holds checkpoints but none is readable: step 4: restore failed "
                                         r"\(JSONDecodeError.*; step 3: no commit_success\.txt.*new checkpoint_dir"):
        _fit(trainer, mesh, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4", "metrics.jsonl"]  # nothing moved


class ScaledRegression(NoisyRegression):
    """NoisyRegression times ``batch["scale"]`` (a NaN there makes the loss and gradients NaN),
    with the metric ``sqrt_aux`` (NaN for a negative ``batch["aux"]``, the loss unaffected)."""

    def loss(self, params, frozen, batch, key):
        loss, metrics = super().loss(params, frozen, batch, key)
        return loss * batch["scale"].mean(), {**metrics, "sqrt_aux": jnp.sqrt(batch["aux"].mean())}


@pytest.fixture(scope="module")
def scaled_trainer(mesh):
    model = MLP(16, nnx.Rngs(0))
    init, step = make_train_step(ScaledRegression(), optax.adam(1e-2), mesh, model=model, rules="fsdp")
    return lambda: init(model), step


def _poisoned_loader(step: int, field: str, value: float):
    """Batches in record order, 8 rows each; update ``step`` (1-based) gets ``field = value``."""
    rng = np.random.default_rng(0)
    records = [{"x": rng.normal(size=4).astype(np.float32), "y": rng.normal(size=2).astype(np.float32),
                "scale": np.float32(1.0), "aux": np.float32(1.0)} for _ in range(64)]
    for record in records[8 * (step - 1): 8 * step]:
        record[field] = np.float32(value)
    return make_loader(records, batch_size=8, seed=0, shuffle=False,
                       read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))


def test_nan_metric_stops_at_its_step_without_checkpointing_it(scaled_trainer, mesh, tmp_path):
    with pytest.raises(NonFiniteMetrics, match=r"step 4: metric\(s\) \['sqrt_aux'\] not finite \(sqrt_aux=nan\)"
                                               r".*not checkpointed") as error:
        _fit(scaled_trainer, mesh, tmp_path, loader=_poisoned_loader(4, "aux", -1.0))
    assert error.value.step == 4 and error.value.metrics == ["sqrt_aux"]
    assert _steps(tmp_path) == [3]
    assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3]


def test_nan_loss_found_late_still_names_its_step_and_blocks_the_save(scaled_trainer, mesh, tmp_path):
    """log_every=10: the metrics are first checked before the save of step 6, after the NaN of step 5."""
    with pytest.raises(NonFiniteMetrics, match=r"step 5: metric\(s\) \[.*'loss'.*\] not finite") as error:
        _fit(scaled_trainer, mesh, tmp_path, log_every=10, loader=_poisoned_loader(5, "scale", np.nan))
    assert {"loss", "grad_norm"} <= set(error.value.metrics) and "sqrt_aux" not in error.value.metrics
    assert _steps(tmp_path) == [3]  # neither step 5's state nor step 6's (NaN params) was saved
    state, _ = _fit(scaled_trainer, mesh, tmp_path, num_steps=4, loader=_poisoned_loader(5, "scale", np.nan))
    assert int(state.step) == 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_other_state_key_or_setup_rejected(trainer, mesh, tmp_path, monkeypatch):
    _fit(trainer, mesh, tmp_path, num_steps=1)
    with pytest.raises(ValueError, match=r"different train state.*params\.fc1\.kernel\.value: \(\(4, 16\), "
                                         r"dtype\('float32'\)\) vs \(\(4, 8\).*new checkpoint_dir"):
        _fit(_trainer(mesh, width=8), mesh, tmp_path)
    with pytest.raises(ValueError, match=r"than the one given: unexpected \['opt_state\.0\.count', "
                                         r"'opt_state\.0\.mu\.fc1\.bias\.value'"):
        _fit(_trainer(mesh, optimizer=optax.sgd(0.1)), mesh, tmp_path)
    init, step = trainer
    with pytest.raises(ValueError, match=r"trained with key .*pass the run's key, or a new checkpoint_dir"):
        fit(step, init(), _loader(), key=jax.random.key(8), num_steps=2, checkpoint_dir=tmp_path,
            progress=False)
    with pytest.raises(ValueError, match="save_every=0: pass a positive number"):
        _fit(trainer, mesh, tmp_path, save_every=0)
    with pytest.raises(ValueError, match="pass metrics_path="):
        _fit(trainer, mesh, "gs://bucket/run")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        _fit(trainer, mesh, tmp_path, tensorboard_dir=tmp_path / "tb")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="2 processes: pass mesh="):
        fit(step, init(), _loader(), key=jax.random.key(SEED), num_steps=2, checkpoint_dir=tmp_path)


def test_tensorboard_events(trainer, mesh, tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto.event_pb2 import Event

    _fit(trainer, mesh, tmp_path, num_steps=3, tensorboard_dir=tmp_path / "tb")
    (events_file,) = (tmp_path / "tb").iterdir()
    data, losses = events_file.read_bytes(), []
    while data:  # TFRecord: length (u64), its crc (u32), the Event, its crc (u32)
        size = int.from_bytes(data[:8], "little")
        event = Event.FromString(data[12:12 + size])
        losses += [(event.step, v.simple_value) for v in event.summary.value if v.tag == "loss"]
        data = data[16 + size:]
    assert [s for s, _ in losses] == [1, 2, 3]
    assert [v for _, v in losses] == pytest.approx([line["loss"] for line in _lines(tmp_path)])


def test_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                 "TPU_PROCESS_ADDRESSES_PATH", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False and calls == []  # this machine: one process, no TPU
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-4]")
    assert initialize_distributed() is True and calls == [1]


def _two_process_worker(process_id: int, port: int, directory: str, sigterm_at: int):
    """One of two CPU processes (2 devices each) running ``fit`` on a 2x2 mesh; process 1 gets
    SIGTERM after update ``sigterm_at`` (0: never). Prints the outcome as JSON."""
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    mesh = make_mesh(data=2, fsdp=2)

    def hook(done, state, metrics):
        if sigterm_at and done >= sigterm_at:
            if process_id == 1 and done == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # slow steps: the notice reaches the other host well before the end

    try:
        state, _ = _fit(_trainer(mesh), mesh, directory, hooks=[hook])
    except Preempted as preempted:
        print(json.dumps({"preempted": preempted.step}))
        return
    params = multihost_utils.process_allgather(state.params, tiled=True)
    print(json.dumps({"step": int(state.step), "params": [x.tolist() for x in jax.tree.leaves(params)]}))


def _run_two_processes(directory, sigterm_at=0):
    """``_two_process_worker`` on processes 0 and 1; their JSON outcomes."""
    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    args = [str(port), str(directory), str(sigterm_at)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.train.test_fit", str(i), *args],
                              cwd=Path(__file__).parents[2], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    return [json.loads(out.splitlines()[-1]) for out in outputs]


@pytest.mark.slow
def test_two_processes_preempted_and_resumed(tmp_path):
    """Each host loads its own shard, Orbax and grain save per process, and SIGTERM on one host
    stops both at the same step (JAX's preemption service): resuming equals an uninterrupted run."""
    run = _run_two_processes
    reference = run(tmp_path / "reference")
    stopped = run(tmp_path / "run", sigterm_at=4)
    assert stopped[0] == stopped[1] and 4 <= stopped[0]["preempted"] < STEPS  # both hosts, one step
    data = tmp_path / "run" / str(stopped[0]["preempted"]) / "data"
    assert {p.name for p in data.glob("*.json")} == {"process_0-of-2.json", "process_1-of-2.json"}
    assert run(tmp_path / "run") == reference
    assert _lines(tmp_path / "run") == _lines(tmp_path / "reference")


@pytest.mark.slow
def test_two_processes_fall_back_together(tmp_path):
    """Step 10's iterator state is garbled for process 1 only: both hosts resume from step 9."""
    reference = _run_two_processes(tmp_path / "reference")
    assert _run_two_processes(tmp_path / "run") == reference
    (tmp_path / "run" / "10" / "data" / "process_1-of-2.json").write_text("{")
    assert _run_two_processes(tmp_path / "run") == reference  # step 10 redone from step 9
    assert len(list((tmp_path / "run").glob("10.unreadable-*"))) == 1
    assert _lines(tmp_path / "run") == _lines(tmp_path / "reference")


if __name__ == "__main__":
    _two_process_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
