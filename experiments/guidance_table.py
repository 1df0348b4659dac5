"""Inference-time guidance on the Shapes world: GenEval-lite, a feature Frechet distance and
sampling time for CFG, CFG-Zero*, PAG, SEG and SoftPAG with HeadHunter-searched heads, plus
Attend-and-Excite's neglect rate and StyleAligned's set consistency.

Every row samples the same fixed prompt set (``--n-per-category`` prompts of each GenEval
category, ``eval_prompts``) from the same initial noise with the base model of ``--preset``
(Euler, ``--steps`` steps), so rows differ only by their guidance. Per row:

- GenEval-lite per category and overall (the analytic verifier, ``jdpt.world.verifier``).
- ``FD``: a Frechet distance (FID's formula, Heusel et al. 2017) between Gaussian fits of
  *verifier features* of the generated images and of rendered ground-truth scenes for the same
  prompts (``--ref-renders`` scenes per prompt). The features of an image (:func:`features`)
  are the number of detected circles, squares, triangles and shapeless blobs, and the fraction
  of the image covered by each palette colour and by colourless blobs. ``FD floor`` in the
  table is the distance between two independent render sets (sampling noise alone).
- Sampling seconds per image (after compilation; the CPU is shared, so timings are rough).

Perturbation rows (PAG, SEG, SoftPAG) run at each scale ``s`` of ``--perturb-scales``, without
CFG (``e_c + s (e_c - e_p)``; the world samples without CFG by default) and with CFG at each of
``--perturb-cfg-scales`` above 1.
PAG and SEG perturb diffusers' DiT default layer (the attention of transformer block 1,
``transformer_blocks.1.attn``) or, when the model has no block 1 (the ``ci`` preset), its last
double-stream block. SoftPAG's heads come from HeadHunter's greedy search
(``jdpt.guidance.head_hunter``) over every head of every attention layer, rewarded by the
verifier's mean score on a search prompt set (other texts than the evaluation set's where the
grammar has enough of them; other noise always), with fixed noise, at the first perturbation
scale and CFG setting.

Attend-and-Excite runs on the two_object and color_attr prompts of the evaluation set; an object
is *neglected* when no detected object has its shape (its colour is not required, so neglect is
about presence). StyleAligned generates ``--style-sets`` sets of ``--style-set-size`` colour-free
prompts each (row 0 the reference); consistency is the mean pairwise histogram intersection of
the sets' colour histograms (:func:`colour_histograms`), with shared attention vs without it
(same noise, same CFG).

    python experiments/guidance_table.py [--preset default] [--n-per-category 32] [--out DIR]

Writes ``DIR/guidance.{json,md,png}`` (``guidance_<preset>.*`` for presets other than
``default``); DIR defaults to ``experiments/results``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jdpt.diffusion.pipeline import to_uint8
from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import flow_sigmas
from jdpt.guidance import CFG, PAG, SEG, CFGZeroStar, HeadSearchConfig, SoftPAG, attention_layers, head_hunter
from jdpt.guidance.attend_excite import AttendExciteConfig, attend_excite_euler
from jdpt.guidance.cfg import cfg
from jdpt.guidance.perturbation import DIT_DEFAULT_LAYERS, select_layers
from jdpt.guidance.style_aligned import StyleAlignedConfig
from jdpt.models.flux import unpack_latents
from jdpt.timing import machine
from jdpt.world.attend_excite import world_maps
from jdpt.world.cache import PRESETS, base_model, model_dir
from jdpt.world.figures import image_grid
from jdpt.world.evaluation import eval_prompts, make_sampler
from jdpt.world.model import SAMPLING_STEPS, WorldModel, empty_prompt
from jdpt.world.scenes import CATEGORIES, Prompt, ShapesConfig, render, sample_prompts
from jdpt.world.style_aligned import world_style_aligned
from jdpt.world.verifier import Detection, verify

RESULTS = Path(__file__).parent / "results"
NOT_QUOTED = "unverified: not quoted"
PAPER = {
    "none": "-",
    "CFG": "-",
    "CFG-Zero*": "Fan et al. 2025: Flux Aesthetic 7.06 -> 7.12 (Tab. 3); ImageNet-256 FID 2.23 -> 2.10 (Tab. 2)",
    "PAG": NOT_QUOTED,
    "SEG": NOT_QUOTED,
    "SoftPAG": NOT_QUOTED,
    "Attend-and-Excite": NOT_QUOTED,
    "StyleAligned": NOT_QUOTED,
}


# --- metrics --------------------------------------------------------------------------------

def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets (FID's formula):
    ``||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2))``.

    ``Tr (S_x S_y)^(1/2)`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric ``S_x^(1/2) S_y S_x^(1/2)`` (same spectrum as ``S_x S_y``), so singular covariances
    (constant features) are fine.

    x: ``[N, F]``, y: ``[M, F]`` with ``N, M >= 2``. Returns a float >= 0 (up to rounding).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"frechet_distance needs two [N >= 2, F] feature sets with the same F; got {x.shape} "
                         f"and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("frechet_distance got non-finite features (NaN or inf)")
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    w, v = np.linalg.eigh(s_x)
    root_x = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_x @ s_y @ root_x), 0, None)).sum()
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(s_x) + np.trace(s_y) - 2 * cross)


def features(objects: Sequence[Sequence[Detection]], shapes: Sequence[str], colors: Sequence[str],
             image_size: int) -> np.ndarray:
    """Verifier features ``[B, len(shapes) + 1 + len(colors) + 1]`` float64 of ``B`` images'
    detections: objects per shape, shapeless objects, then the image fraction covered by each
    colour and by colourless objects."""
    out = np.zeros((len(objects), len(shapes) + len(colors) + 2))
    area = float(image_size**2)
    for i, found in enumerate(objects):
        for d in found:
            out[i, shapes.index(d.shape) if d.shape in shapes else len(shapes)] += 1
            k = colors.index(d.color) if d.color in colors else len(colors)
            out[i, len(shapes) + 1 + k] += d.area / area
    return out


def colour_histograms(objects: Sequence[Sequence[Detection]], colors: Sequence[str]) -> np.ndarray:
    """``[B, K]`` share of each colour in the coloured object area of each image (rows sum to 1;
    all-zero for an image without a coloured object)."""
    out = np.zeros((len(objects), len(colors)))
    for i, found in enumerate(objects):
        for d in found:
            if d.color in colors:
                out[i, colors.index(d.color)] += d.area
    total = out.sum(1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def set_consistency(histograms: np.ndarray) -> float:
    """Mean histogram intersection ``sum_k min(p_k, q_k)`` over the pairs of a set ``[n >= 2, K]``
    (1: every member has the same colour mix; 0: disjoint colours, or an empty image)."""
    h = np.asarray(histograms)
    if h.ndim != 2 or len(h) < 2:
        raise ValueError(f"set_consistency needs a set of >= 2 histograms [n, K]; got shape {h.shape}")
    return float(np.mean([np.minimum(h[i], h[j]).sum() for i, j in itertools.combinations(range(len(h)), 2)]))


def neglected(prompts: Sequence[Prompt], objects: Sequence[Sequence[Detection]]) -> np.ndarray:
    """``[B]`` bool: some object the prompt names has no detection of its shape."""
    if len(prompts) != len(objects):
        raise ValueError(f"{len(prompts)} prompts but detections of {len(objects)} images")
    return np.array([any(all(d.shape != spec.shape for d in found) for spec in p.objects)
                     for p, found in zip(prompts, objects)])


def subject_tokens(prompts: Sequence[Prompt]) -> np.ndarray:
    """``[B, 2]`` int32 positions (BOS at 0) of the two shape nouns of two-object prompts."""
    out = []
    for p in prompts:
        words = p.text.split()
        if len(p.objects) != 2 or any(spec.shape not in words for spec in p.objects):
            raise ValueError(f"prompt {p.text!r} does not name two objects by their shape nouns; use two_object or "
                             "color_attr prompts")
        out.append([1 + words.index(spec.shape) for spec in p.objects])
    return np.asarray(out, np.int32)


# --- sampling -------------------------------------------------------------------------------

def sample_prompts_batched(sample: Callable, model: WorldModel, prompts: Sequence[Prompt], key: jax.Array,
                           batch_size: int, guidance=None, *, warm: bool = True) -> tuple[np.ndarray, float]:
    """One image per prompt, and the seconds spent sampling after a warm-up call. Prompts are
    sampled ``batch_size`` at a time (at most ``len(prompts)``; the last batch padded so one
    compiled shape serves all), the batch starting at prompt ``i`` from ``fold_in(key, i)``: every
    guidance sees the same initial noise."""
    chunks, ids = [], []
    batch_size = min(batch_size, len(prompts))
    for i in range(0, len(prompts), batch_size):
        chunk = model.tokenize([p.text for p in prompts[i:i + batch_size]])
        ids.append((np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)]), len(chunk)))
    if warm:
        np.asarray(sample(ids[0][0], jax.random.fold_in(key, 0), guidance))
    start = time.perf_counter()
    for i, (batch, n) in enumerate(ids):
        chunks.append(np.asarray(sample(batch, jax.random.fold_in(key, i * batch_size), guidance))[:n])
    return np.concatenate(chunks), time.perf_counter() - start


def search_prompts(n_per_category: int, shapes: ShapesConfig, exclude: set[str], seed: int) -> list[Prompt]:
    """``n_per_category`` prompts of each category, distinct where the grammar has enough texts,
    those whose texts are not in ``exclude`` first. Some categories have few texts
    (``single_object``: one per shape), so an evaluation set may use them all; their search
    prompts then repeat evaluation texts, and cycle through the category's texts when it has
    fewer than ``n_per_category`` (each sample gets other noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in CATEGORIES:
        pool = {p.text: p for p in sample_prompts(rng, 50 * n_per_category, shapes, categories=[c])}
        ranked = sorted(pool.values(), key=lambda p: p.text in exclude)  # stable: unseen texts first
        out += [ranked[i % len(ranked)] for i in range(n_per_category)]
    return out


def perturbation_layers(model: WorldModel) -> str:
    """diffusers' DiT default (transformer block 1), else the last double-stream block."""
    names = attention_layers(model.transformer, model.latent_size)
    try:
        select_layers(names, DIT_DEFAULT_LAYERS)
        return DIT_DEFAULT_LAYERS
    except ValueError:
        last = max(int(n.split(".")[1]) for n in names if n.startswith("transformer_blocks."))
        return rf"transformer_blocks\.{last}\.attn"


def _decode(model: WorldModel, tokens: jax.Array) -> jax.Array:
    h, w = model.latent_size
    return to_uint8(model.config.codec().decode_latents(unpack_latents(tokens, h, w)))


def attend_and_excite(model: WorldModel, prompts: Sequence[Prompt], key: jax.Array, *, steps: int,
                      cfg_scale: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Images of ``prompts`` without and with Attend-and-Excite (paper defaults, steps scaled),
    same noise, Euler, CFG ``cfg_scale`` (1: none) for the step itself; and the seconds of each
    run after compilation."""
    ids = jnp.asarray(model.tokenize([p.text for p in prompts]))
    subjects = jnp.asarray(subject_tokens(prompts))
    text_mask = np.asarray(ids) > 2  # the words only (the reference's normalize_eot)
    h, w = model.latent_size
    sigmas = flow_sigmas(steps, shift=model.config.shift)
    z = jax.random.normal(key, (len(prompts), h * w // 4, model.config.flux_config().in_channels), jnp.float32)
    graphdef, state = nnx.split(model)

    def velocity_fn(m: WorldModel):
        context, pooled = m.encode_prompts(ids)
        if cfg_scale == 1:
            return (lambda x, sigma: m(x, jnp.full((x.shape[0],), sigma), context, pooled)), context, pooled
        empty = jnp.broadcast_to(jnp.asarray(empty_prompt(ids.shape[1])), ids.shape)
        neg_context, neg_pooled = m.encode_prompts(empty)

        def velocity(x, sigma):
            both = jnp.concatenate([x, x])
            v = m(both, jnp.full((both.shape[0],), sigma), jnp.concatenate([neg_context, context]),
                  jnp.concatenate([neg_pooled, pooled]))
            v_u, v_c = jnp.split(v.astype(jnp.float32), 2)
            return cfg(v_u, v_c, cfg_scale)

        return velocity, context, pooled

    def before(state, z):
        m = nnx.merge(graphdef, state)
        return _decode(m, euler_flow(velocity_fn(m)[0], z, sigmas))

    def after(state, z):
        m = nnx.merge(graphdef, state)
        velocity, context, pooled = velocity_fn(m)
        tokens, _ = attend_excite_euler(world_maps(m, context, pooled), velocity, z, sigmas, subjects,
                                        (h // 2, w // 2), text_mask=text_mask, config=AttendExciteConfig())
        return _decode(m, tokens)

    out = []
    for fn in (before, after):
        compiled = jax.jit(fn).lower(state, z).compile()
        start = time.perf_counter()
        out.append((np.asarray(compiled(state, z)), time.perf_counter() - start))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def style_sets(model: WorldModel, n_sets: int, size: int, key: jax.Array, *, steps: int, cfg_scale: float,
               seed: int) -> tuple[list[Prompt], np.ndarray, np.ndarray]:
    """``n_sets`` sets of ``size`` colour-free prompts (single_object, counting, two_object);
    images ``[n_sets, size, H, W, 3]`` with StyleAligned (row 0 the reference) and without."""
    prompts = sample_prompts(seed, n_sets * size, model.config.shapes,
                             categories=["single_object", "counting", "two_object"])
    config = StyleAlignedConfig(guidance_scale=cfg_scale)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, key):
        m = nnx.merge(graphdef, state)
        shared = world_style_aligned(m, ids, key, steps=steps, config=config)
        plain = m.generate(ids, key, steps=steps, cfg_scale=cfg_scale)  # same noise, same CFG
        return shared, plain

    shared, plain = [], []
    for s in range(n_sets):
        ids = model.tokenize([p.text for p in prompts[s * size:(s + 1) * size]])
        a, b = run(state, ids, jax.random.fold_in(key, s))
        shared.append(np.asarray(a))
        plain.append(np.asarray(b))
    return prompts, np.stack(shared), np.stack(plain)


# --- the table ------------------------------------------------------------------------------

def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--n-per-category", type=int, default=32, help="evaluation prompts per category")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the json/md/png results")
    parser.add_argument("--cache", default=None, help="model cache (default: $JDPT_CACHE or ~/.cache/jdpt)")
    parser.add_argument("--steps", type=int, default=SAMPLING_STEPS, help="Euler steps of every sampler")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cfg-scales", type=_floats, default=[1.5, 3.0], help="CFG and CFG-Zero* scales")
    parser.add_argument("--perturb-scales", type=_floats, default=[1.0, 3.0],
                        help="PAG / SEG / SoftPAG scales s (3: diffusers' default); HeadHunter searches at the first")
    parser.add_argument("--perturb-cfg-scales", type=_floats, default=[1.0, 3.0],
                        help="CFG w of the perturbation rows (1: without CFG)")
    parser.add_argument("--layers", default=None, help="PAG/SEG layer regex (default: see the module docstring)")
    parser.add_argument("--search-per-category", type=int, default=4, help="HeadHunter search prompts per category")
    parser.add_argument("--search-max-heads", type=int, default=HeadSearchConfig.max_heads)
    parser.add_argument("--search-budget", type=int, default=HeadSearchConfig.budget)
    parser.add_argument("--ref-renders", type=int, default=4, help="rendered reference scenes per prompt (FD)")
    parser.add_argument("--ae-cfg", type=float, default=1.0, help="CFG of the Attend-and-Excite denoising step")
    parser.add_argument("--style-sets", type=int, default=8)
    parser.add_argument("--style-set-size", type=int, default=4)
    parser.add_argument("--style-cfg", type=float, default=1.0, help="CFG of the StyleAligned comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if min(args.n_per_category, args.steps, args.batch_size, args.ref_renders, args.style_sets,
           args.search_per_category) < 1 or args.style_set_size < 2:
        parser.error("--n-per-category, --steps, --batch-size, --ref-renders, --style-sets and --search-per-category "
                     "must be >= 1 and --style-set-size >= 2")
    if not (args.cfg_scales and args.perturb_scales and args.perturb_cfg_scales):
        parser.error("--cfg-scales, --perturb-scales and --perturb-cfg-scales need at least one value each")
    return args


def _row(name: str, method: str, guidance, images: np.ndarray, seconds: float, prompts, model, reference) -> dict:
    verdict = verify(images, prompts, model.config.shapes)
    shapes = model.config.shapes
    feats = features(verdict.objects, shapes.shapes, shapes.colors, shapes.image_size)
    return {"name": name, "method": method, "branches": 1 if guidance is None else len(guidance.branches),
            "geneval_lite": verdict.summary(), "fd": frechet_distance(feats, reference),
            "objects_per_image": float(np.mean([len(o) for o in verdict.objects])),
            "seconds_per_image": seconds / len(images), "paper": PAPER[method], "scores": verdict.score.tolist()}


def run_table(args: argparse.Namespace) -> tuple[dict, dict[str, np.ndarray]]:
    model, meta = base_model(args.preset, cache_dir=args.cache)
    shapes = model.config.shapes
    prompts = eval_prompts(args.n_per_category, model.config)
    key = jax.random.key(args.seed)
    layers = args.layers or perturbation_layers(model)

    def feats(images_or_objects):
        return features(images_or_objects, shapes.shapes, shapes.colors, shapes.image_size)

    renders = [verify(render(prompts, args.seed + 100 + r, shapes), prompts, shapes).objects
               for r in range(args.ref_renders + 1)]
    reference = feats([o for r in renders[:-1] for o in r])
    floor = frechet_distance(feats(renders[-1]), reference)

    sample = make_sampler(model, steps=args.steps)
    rows, grid = [], {}

    def add(name: str, method: str, guidance) -> None:
        images, seconds = sample_prompts_batched(sample, model, prompts, key, args.batch_size, guidance)
        rows.append(_row(name, method, guidance, images, seconds, prompts, model, reference))
        grid[name] = images
        print(f"{name:<28} overall {rows[-1]['geneval_lite']['overall']:.3f}  FD {rows[-1]['fd']:.3f}  "
              f"{rows[-1]['seconds_per_image'] * 1e3:.1f} ms/image", flush=True)

    add("none", "none", None)
    for w in args.cfg_scales:
        add(f"CFG w={w:g}", "CFG", CFG(scale=w))
        add(f"CFG-Zero* w={w:g}", "CFG-Zero*", CFGZeroStar(scale=w))

    def perturbation(cls, name: str, method: str, **kw) -> None:
        for scale, w in itertools.product(args.perturb_scales, args.perturb_cfg_scales):
            guidance = cls(scale=scale, cfg_scale=w, use_cfg=w != 1, **kw)
            add(f"{name} s={scale:g}" + ("" if w == 1 else f" + CFG w={w:g}"), method, guidance)

    perturbation(PAG, "PAG", "PAG", layers=layers)
    perturbation(SEG, "SEG", "SEG", layers=layers)

    # HeadHunter: every head of every attention layer; fixed noise and search prompts.
    heads = {n: info.heads for n, info in attention_layers(model.transformer, model.latent_size).items()}
    eval_texts = {p.text for p in prompts}
    search = search_prompts(args.search_per_category, shapes, eval_texts, args.seed + 1)
    search_key = jax.random.fold_in(key, 10**6)
    search_scale, search_cfg = args.perturb_scales[0], args.perturb_cfg_scales[0]

    def full(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.asarray(weights.get(n, np.zeros(h, np.float32))) for n, h in heads.items()}

    def reward(weights: dict[str, np.ndarray]) -> float:
        guidance = SoftPAG(full(weights), scale=search_scale, cfg_scale=search_cfg, use_cfg=search_cfg != 1)
        images, _ = sample_prompts_batched(sample, model, search, search_key, args.batch_size, guidance,
                                           warm=False)
        return verify(images, search, shapes).summary()["overall"]

    start = time.perf_counter()
    found = head_hunter(reward, heads, HeadSearchConfig(max_heads=args.search_max_heads, budget=args.search_budget))
    search_seconds = time.perf_counter() - start
    print(f"HeadHunter: {found.selected} rewards {found.rewards} ({found.evaluations} evaluations, "
          f"{search_seconds:.0f} s)", flush=True)
    perturbation(SoftPAG, f"SoftPAG {len(found.selected)} heads", "SoftPAG", head_weights=full(found.head_weights()))

    # Attend-and-Excite on the two-object prompts of the evaluation set.
    pairs = [p for p in prompts if p.category in ("two_object", "color_attr")]
    plain, excited, t_plain, t_excited = attend_and_excite(model, pairs, jax.random.fold_in(key, 2 * 10**6),
                                                           steps=args.steps, cfg_scale=args.ae_cfg)
    ae = {}
    for name, images, seconds in (("before", plain, t_plain), ("after", excited, t_excited)):
        verdict = verify(images, pairs, shapes)
        ae[name] = {"neglect_rate": float(neglected(pairs, verdict.objects).mean()),
                    "geneval_lite": verdict.summary(), "seconds_per_image": seconds / len(pairs)}
    grid["A&E before"], grid["A&E after"] = plain, excited

    # StyleAligned set consistency.
    style_prompts, shared, unshared = style_sets(model, args.style_sets, args.style_set_size,
                                                 jax.random.fold_in(key, 3 * 10**6), steps=args.steps,
                                                 cfg_scale=args.style_cfg, seed=args.seed + 2)
    style = {}
    for name, images in (("shared", shared), ("plain", unshared)):
        flat = images.reshape(-1, *images.shape[2:])
        verdict = verify(flat, style_prompts, shapes)
        hists = colour_histograms(verdict.objects, shapes.colors).reshape(args.style_sets, args.style_set_size, -1)
        style[name] = {"consistency": float(np.mean([set_consistency(h) for h in hists])),
                       "geneval_lite": verdict.summary()}
    grid["StyleAligned shared"], grid["StyleAligned plain"] = shared[0], unshared[0]

    result = {
        "preset": args.preset,
        "model": str(model_dir(args.preset, args.cache)),
        "machine": machine(),
        "base_model_eval": meta.get("eval"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache", "argv")},
        "command": " ".join(["python experiments/guidance_table.py", *args.argv]),
        "perturbation_layers": layers,
        "fd_floor": floor,
        "reference_objects_per_image": float(np.mean([len(o) for r in renders for o in r])),
        "rows": rows,
        "head_hunter": {"candidates": heads, "selected": [list(h) for h in found.selected], "rewards": found.rewards,
                        "evaluations": found.evaluations, "search_prompts": len(search),
                        "search_prompts_in_eval_set": sum(p.text in eval_texts for p in search),
                        "seconds": search_seconds,
                        "scale": search_scale, "cfg_scale": search_cfg},
        "attend_and_excite": {"prompts": len(pairs), "cfg_scale": args.ae_cfg, **ae},
        "style_aligned": {"sets": args.style_sets, "set_size": args.style_set_size, "cfg_scale": args.style_cfg,
                          "colors": list(shapes.colors),
                          "prompts": [p.text for p in style_prompts], **style},
    }
    return result, {"grid": grid, "prompts": prompts, "pairs": pairs, "style_prompts": style_prompts}


def figure(result: dict, figures: dict) -> Image.Image:
    """Rows: the methods on one prompt per category; Attend-and-Excite before/after; one
    StyleAligned set shared/plain."""
    grid, prompts, n = figures["grid"], figures["prompts"], result["settings"]["n_per_category"]
    columns = [c * n for c in range(len(CATEGORIES))]
    names = [r["name"] for r in result["rows"]]
    passes = {r["name"]: r["scores"] for r in result["rows"]}
    parts = [image_grid(np.concatenate([grid[m][columns] for m in names]), [prompts[i].text for i in columns] * len(names),
                        columns=len(columns), passed=[passes[m][i] > 0 for m in names for i in columns],
                        row_labels=names)]
    k = min(len(figures["pairs"]), len(CATEGORIES))
    pairs = figures["pairs"][:k]
    ae = np.concatenate([grid["A&E before"][:k], grid["A&E after"][:k]])
    parts.append(image_grid(ae, [p.text for p in pairs] * 2, columns=k, row_labels=["A&E before", "A&E after"]))
    size = result["style_aligned"]["set_size"]
    style = np.concatenate([grid["StyleAligned shared"], grid["StyleAligned plain"]])
    parts.append(image_grid(style, [p.text for p in figures["style_prompts"][:size]] * 2, columns=size,
                            row_labels=["StyleAligned", "no sharing"]))
    width = max(p.width for p in parts)
    canvas = Image.new("RGB", (width, sum(p.height for p in parts) + 10 * (len(parts) - 1)), (255, 255, 255))
    y = 0
    for p in parts:
        canvas.paste(p, (0, y))
        y += p.height + 10
    return canvas


def markdown(result: dict) -> str:
    s = result["settings"]
    cats = [c for c in CATEGORIES if c in result["rows"][0]["geneval_lite"]]
    head = ("| row | branches | " + " | ".join(cats)
            + " | overall | FD | objects/image | ms/image | paper (headline) |")
    lines = [
        f"# Inference-time guidance on the Shapes world, preset `{result['preset']}`",
        "",
        f"Base model `{result['model']}`; {s['n_per_category']} fixed prompts per category (`eval_prompts`), "
        f"one sample each, the same initial noise in every row, {s['steps']} Euler steps. GenEval-lite = the "
        "analytic verifier; overall = mean of the category means. Perturbation layers: "
        f"`{result['perturbation_layers']}`.",
        "",
        "FD = Frechet distance (FID's formula) between Gaussian fits of verifier features of the generated images "
        "and of rendered ground-truth scenes for the same prompts "
        f"({s['ref_renders']} renders per prompt); features per image: number of detected circles, squares, "
        "triangles and shapeless blobs, and the image fraction covered by each colour and by colourless blobs. "
        f"Lower is better; two independent render sets are {result['fd_floor']:.4f} apart (the floor). FD "
        "compares scene statistics only, not prompt following: a sampler that draws fewer objects than a cluttered "
        "base model can lower it while failing every prompt, so read it beside GenEval-lite and objects/image "
        f"(detected objects per image; rendered scenes: {result['reference_objects_per_image']:.2f}). "
        "ms/image: sampling time per image after compilation, on a shared CPU (rough).",
        "",
        head,
        "|" + "---|" * (len(cats) + 7),
    ]
    for r in result["rows"]:
        g = r["geneval_lite"]
        lines.append(f"| {r['name']} | {r['branches']} | " + " | ".join(f"{g[c]:.3f}" for c in cats)
                     + f" | **{g['overall']:.3f}** | {r['fd']:.3f} | {r['objects_per_image']:.2f} | "
                     f"{r['seconds_per_image'] * 1e3:.1f} | "
                     f"{r['paper']} |")
    hh = result["head_hunter"]
    ae = result["attend_and_excite"]
    sa = result["style_aligned"]
    lines += [
        "",
        "## HeadHunter (SoftPAG head search)",
        "",
        f"Greedy search (`head_hunter`, max {s['search_max_heads']} heads, budget {s['search_budget']} evaluations) "
        f"over every head of {json.dumps(hh['candidates'])}; reward = verifier mean score of {hh['search_prompts']} "
        f"search prompts ({hh['search_prompts_in_eval_set']} of them with a text of the evaluation set: the grammar "
        "has few single-object, colour and counting texts; their noise differs; fixed across the search) sampled "
        "with SoftPAG "
        f"(u = 1 on the chosen heads, s={hh['scale']:g}, CFG w={hh['cfg_scale']:g}). Selected heads "
        f"(in order): {', '.join(f'`{layer}`[{h}]' for layer, h in hh['selected']) or 'none (no head raised the reward)'}; "
        f"search reward after each addition: {', '.join(f'{v:.3f}' for v in hh['rewards'])} "
        f"({hh['evaluations']} evaluations, {hh['seconds']:.0f} s). The search reward is measured on few prompts, "
        "so it overstates the gain; the SoftPAG rows above are the held-out result.",
        "",
        "## Attend-and-Excite (two-object prompts)",
        "",
        f"{ae['prompts']} two_object + color_attr prompts of the evaluation set, the paper's defaults "
        f"(step indices scaled to {s['steps']} steps), CFG w={ae['cfg_scale']:g} for the denoising step, same noise. "
        "Neglect = some named object has no detected object of its shape (its colour not required).",
        "",
        "| | neglect rate | GenEval-lite (these prompts) | ms/image |",
        "|---|---|---|---|",
        *[f"| {k} | {ae[k]['neglect_rate']:.3f} | {ae[k]['geneval_lite']['overall']:.3f} | "
          f"{ae[k]['seconds_per_image'] * 1e3:.1f} |" for k in ("before", "after")],
        "",
        f"Paper: {PAPER['Attend-and-Excite']}.",
        "",
        "## StyleAligned (set consistency)",
        "",
        f"{sa['sets']} sets of {sa['set_size']} colour-free prompts (single_object, counting, two_object; image 0 "
        f"the reference), CFG w={sa['cfg_scale']:g}, shared attention on every layer vs none, same noise. "
        "Consistency = mean pairwise histogram intersection of the images' colour histograms (share of each "
        "colour in the detected object area; an image without a coloured object counts 0); single-coloured "
        f"images of independent random colours score about 1/{len(sa['colors'])}.",
        "",
        "| | set consistency | GenEval-lite (set prompts) |",
        "|---|---|---|",
        *[f"| {k} | {sa[k]['consistency']:.3f} | {sa[k]['geneval_lite']['overall']:.3f} |"
          for k in ("shared", "plain")],
        "",
        f"Paper: {PAPER['StyleAligned']}.",
        "",
        f"Machine: `{json.dumps(result['machine'])}`. Produced by `{result['command']}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    result, figures = run_table(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("guidance" if args.preset == "default" else f"guidance_{args.preset}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    figure(result, figures).save(stem.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {stem}.json, {stem}.md and {stem}.png")
    return result


if __name__ == "__main__":
    main()
