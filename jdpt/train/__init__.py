"""The resumable train loop (Orbax checkpoints, grain iterator state, metric logs) and the
multi-host start-up."""

from jdpt.train.fit import NonFiniteMetrics, Preempted, fit, initialize_distributed

__all__ = ["NonFiniteMetrics", "Preempted", "fit", "initialize_distributed"]
