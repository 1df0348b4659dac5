"""Timing helpers shared by the benchmark and experiment scripts (``experiments/``).

``interleaved_times`` times competing functions in turn, so that load drifting during a run
affects every side alike (``interleaved_medians``: their medians); ``machine`` records where a
number was measured (the CPUs this process may run on, which ``taskset`` narrows, and the load
at the time).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times in seconds of ``repeats`` calls of each function, calling them in turn every
    repeat (each function must block until its result is ready)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median of :func:`interleaved_times` per function."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats).items()}


def machine() -> dict:
    """Platform, CPU count, the CPUs this process may use (where the OS tells: Linux), JAX version,
    backend, device kind and the 1/5/15-minute load average."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpus_usable": usable,
            "jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
