"""Claims over independent draws: the crossed bootstrap (evaluate.draws_difference), the draw
offsets (run.with_draw), pooling the persona attack over draws (attack.persona_report). The pooled
smoke run is in test_run.py (it reuses that file's smoke run as its draw 0)."""
import numpy as np
import pytest

import attack
import evaluate
import run

# ---- the statistic ----


def test_draws_difference_covers_the_spread_between_draws():
    rng = np.random.default_rng(0)
    items = rng.normal(0, 0.05, size=(1, 200))
    # three draws that disagree: one shows an effect of +0.3, one none, one -0.2
    disagree = np.concatenate([items + 0.3, items, items - 0.2])
    d = evaluate.draws_difference(disagree)
    assert d["delta"] == pytest.approx(disagree.mean())
    assert d["per_draw"] == pytest.approx([items.mean() + 0.3, items.mean(), items.mean() - 0.2])
    assert d["ci"][0] < 0 < d["ci"][1]  # the draws disagree: no claim
    pooled_items_only = evaluate.paired_delta([disagree.ravel()], [np.zeros(disagree.size)])
    assert pooled_items_only["ci"][0] > 0  # treating 600 values as items would have claimed an effect
    # draws that agree: the CI is the items' CI, tight around the effect
    agree = evaluate.draws_difference(np.concatenate([items + 0.1] * 3))
    assert agree["ci"][0] > 0.08 and agree["ci"][1] < 0.12


def test_draws_difference_of_two_samples_shares_the_draws():
    a = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])   # draw 0 aligned after aligned, draw 1 not
    b = np.array([[0.0, 0.0], [0.0, 0.0]])
    d = evaluate.draws_difference(a, b)
    assert d["per_draw"] == pytest.approx([2 / 3, 0.0]) and d["delta"] == pytest.approx(1 / 3)
    assert d["ci"][0] == pytest.approx(0.0) and d["ci"][1] == pytest.approx(1.0)  # the draw with no link can be drawn twice


# ---- the draws ----


def test_with_draw_offsets_every_seed_but_the_world():
    c = run.resolve_configs(run.build_parser().parse_args([]))
    d = run.with_draw(c, 2)
    for section in ("model", "sft", "grpo", "attack"):
        assert d[section].seed == c[section].seed + 2
    assert d["world"] == c["world"] and d["eval"] == c["eval"]
    assert d["run"].draw == 2 and d["run"].draws == 1
    info = run.draws_info([run.with_draw(c, k) for k in range(3)])
    assert info["n"] == 3 and info["base_seeds"] == [0, 1, 2] and info["rl_seeds"] == [[0], [1], [2]]


def test_persona_report_pools_draws_as_means_with_per_draw_values():
    cfg = attack.AttackConfig(personas=("heldout_harmful_0", "heldout_helpful_2"))
    n = 30
    evals = ["health"] * 10 + ["sycophancy"] * 20

    def draw(trait_degradation):
        none = np.full(n, 0.8)
        return {"evals": evals,
                "baseline": {"none": none.tolist(), "heldout_harmful_0": (none - 0.4).tolist(), "heldout_helpful_2": (none + 0.1).tolist()},
                "trait": {"none": none.tolist(), "heldout_harmful_0": (none - trait_degradation).tolist(),
                          "heldout_helpful_2": (none + 0.1).tolist()}}

    one = attack.persona_report([draw(0.1)], cfg)
    two = attack.persona_report([draw(0.1), draw(0.5)], cfg)
    vs = two["vs"]["trait - baseline"]["groups"]["heldout"]["degradation"]
    assert one["vs"]["trait - baseline"]["groups"]["heldout"]["degradation"]["delta"] == pytest.approx(-0.3)
    assert vs["per_draw"] == pytest.approx([-0.3, 0.1]) and vs["delta"] == pytest.approx(-0.1)
    assert vs["ci"][0] == pytest.approx(-0.3) and vs["ci"][1] == pytest.approx(0.1)  # no item noise: the draws are the CI
    # one draw claims selective persistence (its CI covers items only); the second draw disagrees
    assert one["selective_persistence"]["selective"] is True and two["selective_persistence"]["selective"] is False
    assert two["persona"]["trait"]["per_eval"]["health"]["harmful"] == pytest.approx(0.8 - 0.3)
    # what is left under the switch: trait 0.7 and 0.3 against the baseline's 0.4
    assert two["vs"]["trait - baseline"]["groups"]["heldout"]["under_harmful"]["per_draw"] == pytest.approx([0.3, -0.1])


def test_strict_json_turns_nan_and_infinity_into_null_and_keeps_the_rest():
    value = {"a": [1.0, float("nan"), (2, float("-inf"))], "b": {"c": np.float64("nan"), "d": "x", "e": 3}}
    assert run.strict_json(value) == {"a": [1.0, None, [2, None]], "b": {"c": None, "d": "x", "e": 3}}
