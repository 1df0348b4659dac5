"""experiments/alignment_table.py and bench_dpo_memory.py: the curve bookkeeping and (slow) both
scripts end to end on the ``ci`` preset / a tiny model. The library pieces they run
(``jdpt.world.post_train``, the colour-mass reward) are tested in tests/world/test_alignment.py."""

import json

import numpy as np
import pytest

from jdpt.world.evaluation import eval_prompts, evaluate
from tests.experiment_scripts import load_script

table = load_script("alignment_table")
bench = load_script("bench_dpo_memory")


# --- curve bookkeeping ----------------------------------------------------------------------

def test_steps_to_reach_and_nft_vs_grpo():
    grpo = {"step": [0, 10, 20, 30], "seconds": [0, 50, 100, 150], "probe": [0.2, 0.25, 0.4, 0.35]}
    nft = {"step": [0, 5, 10, 15], "seconds": [0, 40, 80, 120], "probe": [0.2, 0.3, 0.36, 0.5]}
    assert table.steps_to_reach(nft, 0.35) == (10, 80)
    assert table.steps_to_reach(nft, 0.9) is None
    versus = table.nft_vs_grpo({"flow_grpo": {"probe_curve": grpo}, "nft": {"probe_curve": nft}})
    assert versus["grpo_final_probe"] == 0.35 and versus["nft_reach"] == (10, 80)
    assert versus["grpo_first_reach"] == (20, 100) and "note" not in versus
    flat = {**grpo, "probe": [0.2, 0.1, 0.2, 0.15]}
    assert "note" in table.nft_vs_grpo({"flow_grpo": {"probe_curve": flat}, "nft": {"probe_curve": nft}})


def test_moving_average_skips_missing_values():
    got = table.moving_average([1.0, None, 3.0, 5.0], 2)
    np.testing.assert_allclose(got, [1.0, 1.0, 3.0, 4.0])


def test_bad_methods_are_errors():
    with pytest.raises(ValueError, match="unknown \\['grpo'\\]"):
        table.main(["--methods", "grpo"])
    with pytest.raises(ValueError, match="reward_backprop optimises its colour-mass surrogate"):
        table.main(["--methods", "nft,reward_backprop", "--strict-reward"])


# --- the scripts end to end (slow) ----------------------------------------------------------

def _smoke(tmp_path, methods, *extra):
    out = tmp_path / "out"
    report = table.main(["--preset", "ci", "--steps", "2", "--methods", methods, "--out", str(out),
                         "--eval-per-category", "4", "--probe-per-category", "2", "--offline-prompts", "16",
                         "--quiet", *extra])
    name = "alignment_strict" if "--strict-reward" in extra else "alignment"
    assert (out / f"{name}_curves.png").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}{s}" for s in (".json", ".md", "_curves.png"))
    stored = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert f"![curves]({name}_curves.png)" in md
    for m in methods.split(","):
        r = stored["results"][m]
        assert r["steps"] == 2 and r["label"] in md and r["headline"] in md
        assert r["memory"]["peak_bytes"] == (r["memory"]["argument_bytes"] + r["memory"]["output_bytes"]
                                             + r["memory"]["temp_bytes"]) > 0
        assert r["probe_curve"]["step"][0] == 0 and r["probe_curve"]["step"][-1] == 2
        assert all(np.isfinite(r["train_curve"]["loss"]))
        assert set(r["after"]) == set(stored["before"])
        clutter = r["after_clutter"]
        assert clutter["strict_overall"] <= r["after"]["overall"]  # strict only fails more images
        assert f"{stored['before_clutter']['objects_per_image']:.2f} -> {clutter['objects_per_image']:.2f}" in md
    return report


@pytest.mark.slow  # the ci base model (pretrained once into $JDPT_CACHE, ~1 min) + ~8 compiles: ~1 min
def test_alignment_table_smoke_lora(tmp_path):
    report = _smoke(tmp_path, "dpo,nft")
    # "before" is the library's evaluate() on the same prompts and seeds.
    from jdpt.world.cache import base_model

    base, _ = base_model("ci", progress=False)
    prompts = eval_prompts(4, base.config)
    want = evaluate(base, prompts, seed=report["settings"]["seed"] + 8, progress=False)[1].summary()
    assert report["before"] == want
    nft = report["results"]["nft"]
    assert all(0 <= r <= 1 for r in nft["train_curve"]["reward"])  # verifier scores
    assert report["nft_vs_grpo"] is None  # Flow-GRPO not run


@pytest.mark.slow  # the ci base model from $JDPT_CACHE + MaPO and Flow-GRPO compiles: ~1 min
def test_alignment_table_smoke_strict_reward(tmp_path):
    report = _smoke(tmp_path, "mapo,flow_grpo", "--strict-reward")
    assert report["settings"]["strict_reward"] is True
    for r in report["results"].values():
        assert "strict verifier" in r["reward"]
    assert report["results"]["flow_grpo"]["train_curve"]["reward_name"] == "strict verifier score of the rollouts"


@pytest.mark.slow  # full fine-tuning (Flow-GRPO with a reference copy): ~1 min
def test_alignment_table_smoke_full(tmp_path):
    report = _smoke(tmp_path, "reward_backprop,flow_grpo", "--full")
    assert report["results"]["flow_grpo"]["trainable"] == "full transformer"


@pytest.mark.slow  # two DPO steps compiled on a small model: ~45 s
def test_dpo_memory_lora_below_full():
    """LoRA-DPO needs less than full DPO with a reference copy; XLA's sum is what it says."""
    world = dict(width=128, heads=4, text_layers=1, double_layers=2, single_layers=2)
    lora, full = (bench.measure(v, rank=4, pairs=2, world=world) for v in ("lora", "full"))
    for r in (lora, full):
        assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
        # policy == reference: log 2 (tolerance 1e-3: beta = 5000 scales the fp32 rounding difference
        # of the policy and reference forwards, which XLA may fuse differently)
        assert np.isfinite(r["loss"]) and abs(r["loss"] - np.log(2)) < 1e-3
    assert lora["trainable_parameters"] < full["trainable_parameters"] == full["transformer_parameters"]
    # full: params + 2 AdamW moments + reference, fp32, all among the arguments
    assert full["argument_bytes"] >= 4 * 4 * full["transformer_parameters"]
    assert lora["peak_bytes"] < 0.55 * full["peak_bytes"]
