"""The one training loop: ``fit`` (resumable: Orbax checkpoints, grain iterator state, metric
logs; multi-host start-up) runs every kind of training; ``make_online_step`` makes an online
method's rollout and update one step of it."""

from jdpt.train.fit import NonFiniteMetrics, Preempted, fit, initialize_distributed
from jdpt.train.online import make_online_step

__all__ = ["NonFiniteMetrics", "Preempted", "fit", "initialize_distributed", "make_online_step"]
