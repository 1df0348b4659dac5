"""jdpt.timing: the benchmark scripts' shared timer and machine record."""

import os
import time

import jax
import pytest

from jdpt.timing import interleaved_medians, interleaved_times, machine


def test_interleaved_medians_calls_in_turn_and_takes_medians():
    calls = []
    durations = {"short": iter([0.001, 0.030, 0.002]), "long": iter([0.020, 0.021, 0.060])}

    def fn(name):
        def run():
            calls.append(name)
            time.sleep(next(durations[name]))
        return run

    medians = interleaved_medians({"short": fn("short"), "long": fn("long")}, repeats=3)
    assert calls == ["short", "long"] * 3
    # medians of (1, 30, 2) ms and (20, 21, 60) ms; sleep overshoots by well under 5 ms here
    assert 0.002 <= medians["short"] < 0.007
    assert 0.021 <= medians["long"] < 0.026


def test_interleaved_times_records_every_call():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: time.sleep(0.01)}, repeats=4)
    assert calls == ["a"] * 4 and [len(t) for t in times.values()] == [4, 4]
    assert all(t >= 0.01 for t in times["b"]) and all(t < 0.01 for t in times["a"])


def test_interleaved_medians_needs_a_repeat():
    with pytest.raises(ValueError, match="repeats=0"):
        interleaved_medians({"f": lambda: None}, repeats=0)


def test_machine_records_usable_cpus_and_load():
    info = machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert info["cpus_usable"] == usable <= info["cpus"]
    assert info["backend"] == jax.default_backend() and len(info["load_average_1_5_15min"]) == 3
