"""Post-training the Shapes-world base model: seven alignment methods behind one call.

``post_train(base, "nft", AlignSettings(), budget_seconds=300)`` copies the base model, adds LoRA
adapters to the Flux attention projections (or trains the whole transformer with ``full=True``),
and trains one method with the library's pieces, ``jdpt.parallel.make_train_step`` (and
``jdpt.train.online.make_online_step`` for the online methods) driven by ``jdpt.train.fit``,
until a wall-clock budget or a step count is spent:

- offline, on one preference data set made once by the base model and the verifier: SFT on the
  winners, Diffusion-DPO (its flow form: velocity MSEs), MaPO;
- online, the verifier's 0/1 score (GenEval-lite) as the reward: DDPO (DDIM eta = 1 rollouts
  through ``flow_as_epsilon``), Flow-GRPO, DiffusionNFT (``AlignSettings(strict_reward=True)``
  scores the offline pairs and the online rewards with the strict verifier instead, which fails
  images with objects their prompt does not name);
- reward backprop (AlignProp: randomised truncation) on the soft colour-mass surrogate
  (``jdpt.world.colour_mass``; the verifier is not differentiable).

The budget counts rollouts, rewards and updates after the first step (which compiles); probe
evaluations, the final evaluation and the offline data set are outside it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jdpt.models.lora import add_lora
from jdpt.parallel import make_mesh, make_train_step
from jdpt.train import fit
from jdpt.train.online import make_online_step
from jdpt.world.alignment_runs import (
    METHODS,
    OFFLINE,
    AlignSettings,
    OfflineData,
    copy_tree,
    geneval,
    make_offline_data,
    offline_method,
    online_method,
)
from jdpt.world.colour_mass import object_areas
from jdpt.world.model import WorldModel
from jdpt.world.scenes import Prompt

LABELS = {"sft": "SFT on winners", "dpo": "Diffusion-DPO", "mapo": "MaPO", "ddpo": "DDPO",
          "reward_backprop": "Reward backprop (AlignProp)", "flow_grpo": "Flow-GRPO", "nft": "DiffusionNFT"}
REWARDS = {
    "sft": "none: denoising regression on the verifier's winners (offline)",
    "dpo": "verifier preference pairs (offline)",
    "mapo": "verifier preference pairs (offline)",
    "ddpo": "verifier score 0/1 (online)",
    "reward_backprop": "soft colour-mass surrogate (differentiable; blind to shape and position)",
    "flow_grpo": "verifier score 0/1 (online)",
    "nft": "verifier score 0/1 (online)",
}


def reward_description(method: str, strict: bool) -> str:
    """What ``method`` optimises (``REWARDS``), naming the strict verifier where it scores the samples."""
    if method not in REWARDS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if not strict or method == "reward_backprop":
        return REWARDS[method]
    return REWARDS[method].replace("verifier", "strict verifier")
# Flow-GRPO's LoRA targets for SD3 (attention projections of both streams), Flux names.
LORA_TARGETS = [r"attn\.to_[qkv]", r"attn\.to_out\.0", r"attn\.add_[qkv]_proj", r"attn\.to_add_out"]
# Learning rates with LoRA: the papers' where they train LoRA (DDPO, Flow-GRPO, DiffusionNFT
# 3e-4; AlignProp 1e-3); SFT / DPO / MaPO are full fine-tunes in their papers: 3e-4 too here.
# Full fine-tuning divides them by 10.
LORA_LR = {"sft": 3e-4, "dpo": 3e-4, "mapo": 3e-4, "ddpo": 3e-4, "reward_backprop": 1e-3,
           "flow_grpo": 3e-4, "nft": 3e-4}
CLIP_NORM = {"reward_backprop": 5.0}  # AlignProp's max_grad_norm; the rest: Flow-GRPO's 1.0
# Full fine-tuning trains the Flux transformer (as the LoRA adapters sit there), not the text tower.
FULL = nnx.All(nnx.Param, nnx.PathContains("transformer"))


def fresh_model(base: WorldModel, full: bool, settings: AlignSettings) -> WorldModel:
    """A copy of ``base`` (no buffer shared), with LoRA adapters (rank ``settings.lora_rank``,
    alpha twice that) on :data:`LORA_TARGETS` unless ``full``."""
    graphdef, state = nnx.split(base)
    model = nnx.merge(graphdef, copy_tree(state))
    if not full:
        add_lora(model, LORA_TARGETS, rank=settings.lora_rank, alpha=2 * settings.lora_rank,
                 rngs=nnx.Rngs(settings.seed))
    return model


def memory_stats(compiled) -> dict[str, int]:
    """A compiled function's ``memory_analysis()`` in bytes; ``peak_bytes`` = arguments + outputs
    + temporaries (an upper bound: donated arguments alias part of the outputs)."""
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


@dataclasses.dataclass(frozen=True)
class PostTrainResult:
    """One post-training run.

    Attributes:
        method: the method's key in :data:`METHODS`; ``label`` its display name.
        model: the post-trained model (LoRA adapters included unless ``trainable`` is the full
            transformer); sample it like the base model (``jdpt.world.evaluate``).
        trainable, learning_rate: what was trained, at which AdamW rate.
        steps: optimizer steps done; ``train_seconds``: wall-clock of steps 2.. (the budget's clock);
            ``compile_seconds``: compiling the train step (with its memory analysis).
        mean_iteration_seconds, mean_update_seconds: one step after compile (host work + update;
            the update alone); None after a single step.
        memory: the compiled train step's :func:`memory_stats`.
        train_curve: ``step``, ``loss`` and ``reward`` (the training reward per step; None for
            offline methods) lists and ``reward_name``.
        probe_curve: ``step``, ``seconds``, ``probe`` (GenEval-lite overall on the probe set) at
            step 0 and ``settings.probes`` points along the run; None without a probe set.
        after, after_scores, after_clutter: GenEval-lite summary, ``[B]`` 0/1 scores and
            :meth:`jdpt.world.verifier.Verdict.clutter` on the evaluation set after training;
            None without one.
    """

    method: str
    label: str
    model: Any
    trainable: str
    learning_rate: float
    steps: int
    train_seconds: float
    compile_seconds: float
    mean_iteration_seconds: float | None
    mean_update_seconds: float | None
    memory: dict[str, int] | None
    train_curve: dict[str, Any]
    probe_curve: dict[str, list] | None = None
    after: dict[str, float] | None = None
    after_scores: np.ndarray | None = None
    after_clutter: dict[str, float] | None = None


class _Clock:
    """The run's hook for ``jdpt.train.fit``: the budget's clock (wall-clock of steps 2..,
    without the probe evaluations), the training curve, the probe curve and the progress bar.
    Returns True (ends the run) once the budget is spent."""

    def __init__(self, method: str, budget: float | None, steps: int | None, probe, probes: int,
                 progress: bool):
        self.budget, self.steps, self.probe, self.probes = budget, steps, probe, probes
        self.elapsed, self.iterations, self.rollouts = 0.0, [], []
        self.curve = {"step": [], "loss": [], "reward": []}
        self.probe_curve = None if probe is None else {"step": [0], "seconds": [0.0], "probe": []}
        self.next_probe = 1
        if steps is not None:
            self.bar = tqdm(total=steps, desc=LABELS[method], unit="step", disable=not progress)
        else:
            self.bar = tqdm(total=budget, desc=LABELS[method], unit="s", disable=not progress,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s budget{postfix}")

    def start(self, state) -> None:
        if self.probe is not None:
            self.probe_curve["probe"].append(self.probe(state))
        self.last = time.perf_counter()

    def __call__(self, done: int, state, metrics) -> bool:
        now = time.perf_counter()
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if done > 1:  # the first step compiles the rollout and the update
            self.iterations.append(now - self.last)
            self.rollouts.append(values.get("rollout_seconds", 0.0))
            self.elapsed += now - self.last
        self.curve["step"].append(done)
        self.curve["loss"].append(values["loss"])
        self.curve["reward"].append(values.get("reward"))
        self.bar.update(1 if self.steps is not None else min(self.elapsed, self.budget) - self.bar.n)
        self.bar.set_postfix(step=done, loss=f"{values['loss']:.4g}", t=f"{self.elapsed:.0f}s")
        finished = (self.steps is not None and done >= self.steps) or (
            self.budget is not None and self.elapsed >= self.budget)
        due = finished or (self.steps is not None and done >= self.next_probe * self.steps / self.probes) or (
            self.budget is not None and self.elapsed >= self.next_probe * self.budget / self.probes)
        if due:
            self.next_probe += 1
            if self.probe is not None:
                self.probe_curve["step"].append(done)
                self.probe_curve["seconds"].append(self.elapsed)
                self.probe_curve["probe"].append(self.probe(state))
        self.last = time.perf_counter()  # probes are outside the budget
        return finished


def post_train(base: WorldModel, method: str, settings: AlignSettings = AlignSettings(), *,
               budget_seconds: float | None = None, steps: int | None = None, full: bool = False,
               lr: float | None = None, data: OfflineData | None = None, areas: dict[str, float] | None = None,
               eval_set: list[Prompt] | None = None, probe_set: list[Prompt] | None = None,
               checkpoint_dir: str | Path | None = None, progress: bool = True) -> PostTrainResult:
    """Post-train a copy of ``base`` with ``method`` (one of :data:`METHODS`) until
    ``budget_seconds`` of training time or ``steps`` steps, whichever ends first.

    The run is the library's: ``make_train_step`` on the method's objective (through
    :func:`jdpt.train.online.make_online_step` for the online methods) driven by
    ``jdpt.train.fit``. ``checkpoint_dir``: its checkpoint folder (a step-limited run interrupted
    there resumes from its last checkpoint); None: a temporary folder, removed at the end.
    ``data``: the offline methods' preference data (:func:`make_offline_data`; made here when
    None). ``areas``: reward backprop's object areas (``object_areas``; computed when None).
    ``lr``: overrides :data:`LORA_LR` (divided by 10 for ``full``). ``probe_set`` / ``eval_set``:
    prompts scored along the run (seed ``settings.seed + 7``) / after it (seed ``settings.seed + 8``).
    ``base`` itself is left unchanged.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if not isinstance(base, WorldModel):
        raise ValueError(f"post_train trains the Flux world model (WorldModel: presets 'default', 'ci'); "
                         f"got a {type(base).__name__}")
    if budget_seconds is None and steps is None:
        raise ValueError("post_train needs budget_seconds or steps (or both); got neither")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if budget_seconds is not None and not budget_seconds > 0:
        raise ValueError(f"budget_seconds={budget_seconds} must be > 0")
    config = base.config.shapes
    if method == "reward_backprop" and settings.strict_reward:
        raise ValueError("AlignSettings.strict_reward applies to the verifier's rewards; reward_backprop "
                         "optimises the differentiable colour-mass surrogate instead: set strict_reward=False")
    if method in OFFLINE and data is None:
        data = make_offline_data(base, settings, progress=progress)
    if method in OFFLINE and data.strict != settings.strict_reward:
        raise ValueError(f"the offline data was scored with strict={data.strict} but "
                         f"AlignSettings.strict_reward={settings.strict_reward}: make it with "
                         "make_offline_data(base, settings) for these settings")
    if method == "reward_backprop" and areas is None:
        areas = object_areas(config)
    model = fresh_model(base, full, settings)
    run = offline_method(method, data, settings) if method in OFFLINE else online_method(method, model, settings, areas)
    rate = lr if lr is not None else LORA_LR[method] / (10 if full else 1)
    mesh = make_mesh(devices=jax.devices()[:1])
    init_state, step = make_train_step(run.objective, optax.adamw(rate, weight_decay=1e-4), mesh, model=model,
                                       trainable=FULL if full else "lora", clip_norm=CLIP_NORM.get(method, 1.0))
    if run.online is not None:
        step = make_online_step(run.objective, step, **run.online)
    extra = None
    if full and method in ("dpo", "flow_grpo", "nft"):  # the objectives with a reference term
        extra = {"reference": copy_tree(nnx.state(model, FULL))}
    state = init_state(model, extra=extra)
    key = jax.random.key(settings.seed + 6)
    c0 = time.perf_counter()  # compile + memory analysis, outside the budget
    memory = memory_stats(step.lower(state, next(iter(run.loader)), jax.random.fold_in(key, 0)).compile())
    compile_s = time.perf_counter() - c0

    def probe(state):
        return geneval(state.frozen.model(state.params), probe_set, seed=settings.seed + 7).summary()["overall"]

    clock = _Clock(method, budget_seconds, steps, None if probe_set is None else probe, settings.probes, progress)
    clock.start(state)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="jdpt-align-"))
    try:
        state, _ = fit(step, state, run.loader, key=key, num_steps=steps or 10**9, checkpoint_dir=directory,
                       save_every=10**9, log_every=1, progress=False, hooks=[clock])
    finally:
        clock.bar.close()
        if checkpoint_dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    trained = state.frozen.model(state.params)
    evaluation = {}
    if eval_set is not None:
        verdict = geneval(trained, eval_set, seed=settings.seed + 8)
        evaluation = dict(after=verdict.summary(), after_scores=verdict.score, after_clutter=verdict.clutter())
    iterations = clock.iterations
    return PostTrainResult(
        method=method, label=LABELS[method], model=trained,
        trainable="full transformer" if full else f"LoRA r{settings.lora_rank}", learning_rate=rate,
        steps=int(state.step), train_seconds=clock.elapsed, compile_seconds=compile_s,
        mean_iteration_seconds=float(np.mean(iterations)) if iterations else None,
        mean_update_seconds=float(np.mean(iterations) - np.mean(clock.rollouts)) if iterations else None,
        memory=memory, train_curve={**clock.curve, "reward_name": run.reward_name}, probe_curve=clock.probe_curve,
        **evaluation)
