"""Post-training objectives: each a frozen hyper-parameter dataclass (the paper's defaults) with
``loss(params, frozen, batch, key) -> (scalar, metrics)`` for :func:`jdpt.parallel.make_train_step`."""
