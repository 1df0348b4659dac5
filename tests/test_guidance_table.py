"""experiments/guidance_table.py and bench_guidance_cost.py: the metric functions against
independent references, the world model's ``guidance=`` plumbing, and (slow) both scripts end to
end on the ``ci`` preset."""

import itertools
import json

import jax
import numpy as np
import pytest
import scipy.linalg

from jdpt.guidance import PAG
from jdpt.world.evaluation import eval_prompts, make_sampler
from jdpt.world.scenes import CATEGORIES, ShapesConfig, parse_prompt, render, tokenize, vocabulary
from jdpt.world.verifier import Detection, verify
from tests.experiment_scripts import load_script
from tests.objectives.fixtures_offline import TINY_WORLD, tiny_world

table = load_script("guidance_table")
SHAPES = ShapesConfig()


# --- Frechet distance -----------------------------------------------------------------------

def _scipy_frechet(x, y):
    """FID's closed form with scipy's general matrix square root of S_x S_y."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s_x @ s_y).real
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(s_x + s_y - 2 * root))


def test_frechet_distance_matches_scipy_closed_form():
    """Correlated 5-d Gaussians of different means and covariances: |ours - scipy| <= 1e-8 * (1 + FD)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    x = rng.normal(size=(400, 5)) @ a + 1.0
    y = rng.normal(size=(300, 5)) @ b - 0.5
    want = _scipy_frechet(x, y)
    assert want > 1
    assert abs(table.frechet_distance(x, y) - want) <= 1e-8 * (1 + want)
    assert abs(table.frechet_distance(x, x)) <= 1e-9  # a set is at distance 0 from itself


def test_frechet_distance_one_dimension_and_singular_covariance():
    """1-d: FD = (mu_x - mu_y)^2 + (sd_x - sd_y)^2 exactly (tol 1e-10). A constant feature (the
    covariance singular) adds its squared mean difference only (tol 1e-8 vs scipy)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(2.0, 3.0, (50, 1)), rng.normal(-1.0, 0.5, (70, 1))
    want = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert abs(table.frechet_distance(x, y) - want) <= 1e-10
    x2 = np.concatenate([rng.normal(size=(60, 3)), np.full((60, 1), 2.0)], 1)
    y2 = np.concatenate([rng.normal(size=(60, 3)) * 2, np.full((60, 1), 5.0)], 1)
    want = table.frechet_distance(x2[:, :3], y2[:, :3]) + 9.0
    assert abs(table.frechet_distance(x2, y2) - want) <= 1e-8 * want
    assert abs(table.frechet_distance(x2[:, :3], y2[:, :3]) - _scipy_frechet(x2[:, :3], y2[:, :3])) <= 1e-8 * want


def test_frechet_distance_errors_name_the_problem():
    with pytest.raises(ValueError, match="same F"):
        table.frechet_distance(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="N >= 2"):
        table.frechet_distance(np.zeros((1, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        table.frechet_distance(np.full((3, 2), np.nan), np.zeros((4, 2)))


# --- verifier features, colour histograms, neglect ------------------------------------------

def _det(shape, color, area):
    return Detection(shape, color, (0.0, 0.0), area)


def test_features_count_shapes_and_colour_areas():
    """Hand-computed vectors: counts per (circle, square, triangle, shapeless), then the image
    fraction per colour and for colourless objects (exact)."""
    objects = [[_det("circle", "red", 64), _det("circle", "blue", 32), _det(None, None, 16)],
               [_det("triangle", "red", 128)], []]
    got = table.features(objects, ("circle", "square", "triangle"), ("red", "green", "blue"), 32)
    want = np.array([[2, 0, 0, 1, 64 / 1024, 0, 32 / 1024, 16 / 1024],
                     [0, 0, 1, 0, 128 / 1024, 0, 0, 0],
                     [0] * 8])
    np.testing.assert_array_equal(got, want)


def test_colour_histograms_and_set_consistency():
    """Histograms are area shares of coloured objects; consistency is the mean pairwise
    intersection, checked against an explicit double loop (tol 1e-12)."""
    colors = ("red", "green", "blue")
    objects = [[_det("circle", "red", 30), _det("square", "blue", 10)], [_det("circle", "red", 5)],
               [_det("square", None, 9)], [_det("triangle", "green", 4), _det("circle", "blue", 4)]]
    h = table.colour_histograms(objects, colors)
    np.testing.assert_allclose(h, [[0.75, 0, 0.25], [1, 0, 0], [0, 0, 0], [0, 0.5, 0.5]], atol=1e-12)
    pairs = [sum(min(h[i][k], h[j][k]) for k in range(3)) for i in range(4) for j in range(i + 1, 4)]
    assert abs(table.set_consistency(h) - np.mean(pairs)) <= 1e-12
    assert table.set_consistency(np.tile([0.2, 0.3, 0.5], (3, 1))) == pytest.approx(1.0, abs=1e-12)
    assert table.set_consistency(np.eye(3)) == 0.0
    with pytest.raises(ValueError, match=">= 2 histograms"):
        table.set_consistency(h[:1])


def test_neglect_on_rendered_scenes():
    """Rendered two-object scenes neglect nothing; a scene rendered for only the first object
    neglects the second; a black image neglects both (its prompt counts once)."""
    prompts = [parse_prompt(t) for t in ("a circle and a square", "a red triangle and a blue circle")]
    full = render(prompts, 0, SHAPES)
    firsts = render([parse_prompt(f"a {p.objects[0].shape}") for p in prompts], 0, SHAPES)
    objects = lambda images: verify(images, prompts, SHAPES).objects  # noqa: E731
    np.testing.assert_array_equal(table.neglected(prompts, objects(full)), [False, False])
    np.testing.assert_array_equal(table.neglected(prompts, objects(firsts)), [True, True])
    np.testing.assert_array_equal(table.neglected(prompts, objects(np.zeros_like(full))), [True, True])
    with pytest.raises(ValueError, match="2 prompts but detections of 1"):
        table.neglected(prompts, objects(full)[:1])


def test_subject_tokens_point_at_the_shape_nouns():
    prompts = [parse_prompt(t) for t in ("a circle and a square", "a red triangle and a blue circle")]
    ids = tokenize([p.text for p in prompts], SHAPES)
    tokens = table.subject_tokens(prompts)
    vocab = vocabulary(SHAPES)
    assert [[vocab[ids[i, k]] for k in row] for i, row in enumerate(tokens)] == [["circle", "square"],
                                                                                 ["triangle", "circle"]]
    with pytest.raises(ValueError, match="two objects"):
        table.subject_tokens([parse_prompt("three squares")])


def test_search_prompts_prefer_texts_outside_the_evaluation_set():
    """Categories with many texts (position, color_attr) get texts outside the evaluation set;
    single_object has only one text per shape, so its search prompts are those three; texts are
    distinct within a category; asking for more than the grammar has cycles through its texts."""
    evaluation = eval_prompts(8, TINY_WORLD)
    texts = {p.text for p in evaluation}
    search = table.search_prompts(3, SHAPES, texts, seed=5)
    assert [p.category for p in search[::3]] == [p.category for p in evaluation[::8]]  # category-major
    by_category = {p.category: [] for p in search}
    for p in search:
        by_category[p.category].append(p.text)
    assert all(len(set(v)) == 3 for v in by_category.values())
    assert not texts & set(by_category["position"] + by_category["color_attr"])
    assert set(by_category["single_object"]) == {"a circle", "a square", "a triangle"}
    more = table.search_prompts(4, SHAPES, texts, seed=5)
    singles = [p.text for p in more if p.category == "single_object"]
    assert len(more) == 4 * len(CATEGORIES) and len(singles) == 4 and singles[3] == singles[0]
    assert set(singles) == {"a circle", "a square", "a triangle"}


# --- guidance= through the world model's sampler --------------------------------------------

def test_world_sampler_passes_guidance():
    """make_sampler(guidance=PAG(s=0, w)) reproduces cfg_scale=w (max 1 uint8 level: fp32
    summation order); a PAG of the same structure passed to the sampler call replaces it
    (no recompilation): s = 3 changes the images."""
    model = tiny_world(0)
    ids = model.tokenize(["a red circle", "two squares"])
    key = jax.random.key(3)
    want = np.asarray(make_sampler(model, steps=2, cfg_scale=2.5)(ids, key)).astype(int)
    layers = r"transformer_blocks\.0\.attn"
    sample = make_sampler(model, steps=2, guidance=PAG(scale=0.0, cfg_scale=2.5, layers=layers))
    assert np.abs(np.asarray(sample(ids, key)).astype(int) - want).max() <= 1
    pag = np.asarray(sample(ids, key, PAG(scale=3.0, cfg_scale=2.5, layers=layers))).astype(int)
    assert np.abs(pag - want).max() > 1


def test_perturbation_layers_default_and_fallback():
    assert table.perturbation_layers(tiny_world(0)) == r"transformer_blocks\.0\.attn"  # one double block


# --- the scripts end to end (slow) ----------------------------------------------------------

@pytest.mark.slow  # the ci base model (pretrained once into $JDPT_CACHE if absent, ~2 min) + ~15 compiles: ~1-2 min
def test_guidance_table_runs_on_the_ci_preset(tmp_path):
    result = table.main(["--preset", "ci", "--n-per-category", "1", "--steps", "2", "--cfg-scales", "2",
                         "--perturb-scales", "3", "--perturb-cfg-scales", "1", "--search-per-category", "1",
                         "--search-budget", "3", "--style-sets", "1", "--style-set-size", "2", "--ref-renders", "2",
                         "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "guidance_ci.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(result["rows"]))
    names = [r["name"] for r in stored["rows"]]
    assert names[:3] == ["none", "CFG w=2", "CFG-Zero* w=2"]
    assert names[3:5] == ["PAG s=3", "SEG s=3"] and names[5].startswith("SoftPAG")
    for row in stored["rows"]:
        assert 0 <= row["geneval_lite"]["overall"] <= 1 and row["fd"] >= -1e-9 and row["seconds_per_image"] > 0
        assert row["objects_per_image"] >= 0
    assert stored["head_hunter"]["evaluations"] <= 3
    for k in ("before", "after"):
        assert 0 <= stored["attend_and_excite"][k]["neglect_rate"] <= 1
        assert 0 <= stored["style_aligned"]["shared" if k == "before" else "plain"]["consistency"] <= 1
    md = (tmp_path / "guidance_ci.md").read_text()
    assert "| PAG s=3 | 2 |" in md and "neglect rate" in md and "2.23 -> 2.10" in md
    assert (tmp_path / "guidance_ci.png").stat().st_size > 0


@pytest.mark.slow  # six sampling programs compiled (three through the Pallas kernel in interpret mode): ~60 s
def test_bench_guidance_cost_runs(tmp_path):
    bench = load_script("bench_guidance_cost")
    result = bench.main(["--preset", "ci", "--batch", "1", "--steps", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert set(result["rows"]) == {f"{g} ({i})" for g, i in itertools.product(("CFG", "PAG", "CFG+PAG"),
                                                                                 ("xla", "pallas"))}
    assert [result["rows"][f"{g} (xla)"]["branches"] for g in ("CFG", "PAG", "CFG+PAG")] == [2, 2, 3]
    assert all(r["times"] == [r["seconds"]] for r in result["rows"].values())  # one repeat each
    assert all(v > 0 for v in result["ratios"].values())
    md = (tmp_path / "bench_guidance_cost.md").read_text()
    assert "PAG (pallas) / CFG (xla)" in md and "CFG+PAG (pallas) / CFG (xla)" in md
