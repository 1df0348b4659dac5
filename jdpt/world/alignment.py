"""Post-training the Shapes-world base model: seven alignment methods behind one call.

``post_train(base, "nft", AlignSettings(), budget_seconds=300)`` copies the base model, adds LoRA
adapters to the Flux attention projections (or trains the whole transformer with ``full=True``),
and trains one method with ``jdpt.parallel.make_train_step`` until a wall-clock budget or a step
count is spent:

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
import math
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jdpt.models.lora import add_lora
from jdpt.parallel import make_mesh, make_train_step
from jdpt.world.alignment_runs import (
    METHODS,
    OFFLINE,
    AlignSettings,
    OfflineData,
    copy_tree,
    geneval,
    make_offline_data,
    offline_run,
    online_run,
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


def _bar(method: str, budget: float | None, steps: int | None, progress: bool):
    if steps is not None:
        return tqdm(total=steps, desc=LABELS[method], unit="step", disable=not progress)
    return tqdm(total=budget, desc=LABELS[method], unit="s", disable=not progress,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s budget{postfix}")


def post_train(base: WorldModel, method: str, settings: AlignSettings = AlignSettings(), *,
               budget_seconds: float | None = None, steps: int | None = None, full: bool = False,
               lr: float | None = None, data: OfflineData | None = None, areas: dict[str, float] | None = None,
               eval_set: list[Prompt] | None = None, probe_set: list[Prompt] | None = None,
               progress: bool = True) -> PostTrainResult:
    """Post-train a copy of ``base`` with ``method`` (one of :data:`METHODS`) until
    ``budget_seconds`` of training time or ``steps`` steps, whichever ends first.

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
    if method in OFFLINE and data is None:
        data = make_offline_data(base, settings, progress=progress)
    if method in OFFLINE and data.strict != settings.strict_reward:
        raise ValueError(f"the offline data was scored with strict={data.strict} but "
                         f"AlignSettings.strict_reward={settings.strict_reward}: make it with "
                         "make_offline_data(base, settings) for these settings")
    if method == "reward_backprop" and areas is None:
        areas = object_areas(config)
    model = fresh_model(base, full, settings)
    run = offline_run(method, data, settings) if method in OFFLINE else online_run(method, model, settings, areas)
    rate = lr if lr is not None else LORA_LR[method] / (10 if full else 1)
    optimizer = optax.adamw(rate, weight_decay=1e-4)
    trainable = FULL if full else "lora"
    mesh = make_mesh(devices=jax.devices()[:1])
    init_state, step = make_train_step(run.objective, optimizer, mesh, model=model, trainable=trainable,
                                       clip_norm=CLIP_NORM.get(method, 1.0))
    params = nnx.state(model, FULL if full else nnx.LoRAParam)
    extra = run.extra(params)
    if full and method in ("dpo", "flow_grpo", "nft"):  # the objectives with a reference term
        extra = {**(extra or {}), "reference": copy_tree(params)}
    state = init_state(model, extra=extra)
    key = jax.random.key(settings.seed + 6)

    def probe(state):
        return geneval(state.params, state.frozen, probe_set, config, seed=settings.seed + 7).summary()["overall"]

    curve = None if probe_set is None else {"step": [0], "seconds": [0.0], "probe": [probe(state)]}
    train_curve = {"step": [], "reward": [], "loss": []}
    iteration_s, update_s = [], []
    elapsed, i, compile_s, memory = 0.0, 0, 0.0, None
    limit = steps if steps is not None else math.inf
    budget = budget_seconds
    next_probe = 1
    bar = _bar(method, budget, steps, progress)
    while i < limit and (budget is None or elapsed < budget):
        t0 = time.perf_counter()
        batch, reward = run.batch(state, i)
        if i == 0:  # compile + memory analysis outside the budget
            c0 = time.perf_counter()
            memory = memory_stats(step.lower(state, batch, jax.random.fold_in(key, i)).compile())
            compile_s = time.perf_counter() - c0
            t0 += compile_s
        t1 = time.perf_counter()
        state, metrics = step(state, batch, jax.random.fold_in(key, i))
        metrics = jax.device_get(metrics)
        state = run.after(state, i)
        jax.block_until_ready(state.params)
        t2 = time.perf_counter()
        i += 1
        if i > 1:  # the first iteration compiles the rollout and the step
            iteration_s.append(t2 - t0)
            update_s.append(t2 - t1)
            elapsed += t2 - t0
        if reward is None and "reward" in metrics:
            reward = float(metrics["reward"])
        train_curve["step"].append(i)
        train_curve["loss"].append(float(metrics["loss"]))
        train_curve["reward"].append(reward)
        bar.update(1 if steps is not None else min(elapsed, budget) - bar.n)
        bar.set_postfix(step=i, loss=f"{float(metrics['loss']):.4g}", t=f"{elapsed:.0f}s")
        due = (steps is not None and i >= next_probe * steps / settings.probes) or (
            budget is not None and elapsed >= next_probe * budget / settings.probes)
        done = i >= limit or (budget is not None and elapsed >= budget)
        if curve is not None and (due or done):
            curve["step"].append(i)
            curve["seconds"].append(elapsed)
            curve["probe"].append(probe(state))
        if due or done:
            next_probe += 1
    bar.close()
    evaluation = {}
    if eval_set is not None:
        verdict = geneval(state.params, state.frozen, eval_set, config, seed=settings.seed + 8)
        evaluation = dict(after=verdict.summary(), after_scores=verdict.score, after_clutter=verdict.clutter())
    return PostTrainResult(
        method=method, label=LABELS[method], model=state.frozen.model(state.params),
        trainable="full transformer" if full else f"LoRA r{settings.lora_rank}", learning_rate=rate, steps=i,
        train_seconds=elapsed, compile_seconds=compile_s,
        mean_iteration_seconds=float(np.mean(iteration_s)) if iteration_s else None,
        mean_update_seconds=float(np.mean(update_s)) if update_s else None, memory=memory,
        train_curve={**train_curve, "reward_name": run.reward_name}, probe_curve=curve,
        **evaluation)
