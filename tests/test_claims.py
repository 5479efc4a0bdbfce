"""The claim computation (fmr1lib.claims): paired differences, t intervals, verdicts, read on a
hand-made table whose answers are worked out by hand below."""

from __future__ import annotations

import math

import pytest

from fmr1lib import ablation, claims, config


def _entry(row, values, split="test_ood", metric="conflict_accuracy"):
    return {"row": row, "split": split, "metric": metric, "seed_means": list(values),
            "mean": sum(values) / len(values), "std": float("nan"), "n_seeds": len(values)}


TABLE = [
    _entry("faithful_mr1", [0.50, 0.60, 0.70]),
    _entry("anchoring_grpo", [0.40, 0.40, 0.40]),
    _entry("anchoring", [0.30, 0.50, 0.40]),
    _entry("plain_sft", [0.40, 0.40, 0.60]),
    _entry("backbone", [0.20]),
]


def test_paired_difference_interval_and_verdict_by_hand():
    c = claims.Claim("x", "conflict_accuracy", "test_ood", "faithful_mr1", "anchoring_grpo")
    out = claims.compare(TABLE, c, [0, 1, 2])
    # Differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t(2) * 0.1 / sqrt(3) = 0.24843.
    assert out["seed_diffs"] == pytest.approx([0.1, 0.2, 0.3])
    assert out["diff_mean"] == pytest.approx(0.2)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert out["ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    assert out["verdict"] == "inconclusive"  # lo = -0.048 < 0
    assert out["n_seeds"] == 3 and out["a"] == "faithful_mr1" and out["b"] == "anchoring_grpo"


def test_verdicts_follow_the_interval():
    up = [_entry("a", [0.5, 0.6, 0.55, 0.58, 0.52]), _entry("b", [0.1, 0.2, 0.15, 0.1, 0.2])]
    c = claims.Claim("x", "conflict_accuracy", "test_ood", "a", "b")
    assert claims.compare(up, c, range(5))["verdict"] == "supported"
    down = claims.Claim("x", "conflict_accuracy", "test_ood", "b", "a")
    res = claims.compare(up, down, range(5))
    assert res["verdict"] == "refuted" and res["ci95"][1] < 0


def test_shared_backbone_row_pairs_with_every_seed():
    c = claims.Claim("x", "conflict_accuracy", "test_ood", "anchoring", "backbone")
    out = claims.compare(TABLE, c, [0, 1, 2])
    assert out["seed_diffs"] == pytest.approx([0.1, 0.3, 0.2])


def test_rows_with_different_seed_counts_are_refused():
    table = [_entry("a", [0.1, 0.2]), _entry("b", [0.1, 0.2, 0.3])]
    with pytest.raises(ValueError, match="same seeds"):
        claims.compare(table, claims.Claim("x", "conflict_accuracy", "test_ood", "a", "b"), [0, 1])


def test_missing_entry_names_row_split_and_metric():
    with pytest.raises(KeyError, match="'anchoring', 'test_id', 'accuracy'"):
        claims.seed_values(TABLE, "anchoring", "test_id", "accuracy")


def test_one_seed_is_inconclusive_with_no_interval():
    table = [_entry("a", [0.9]), _entry("b", [0.1])]
    c = claims.Claim("x", "conflict_accuracy", "test_ood", "a", "b")
    # Both rows have one value: a shared row pairs with one seed; no interval from one difference.
    out = claims.compare(table, c, [0])
    assert out["verdict"] == "inconclusive" and all(math.isnan(v) for v in out["ci95"])


def test_t_quantiles_match_the_tables():
    assert claims.t975(1) == 12.706 and claims.t975(4) == 2.776 and claims.t975(1000) == 1.96
    with pytest.raises(ValueError):
        claims.t975(0)


def test_answer_change_and_route_shares():
    before = [{"id": i, "pred": p} for i, p in enumerate(["red", "blue", None, "green"])]
    after = [{"id": i, "pred": p} for i, p in enumerate(["red", "green", None, "Green"])]
    assert claims.answer_change(after, before) == pytest.approx(0.25)
    shares = claims.route_shares([
        {"response": "<think>the corner patch is red</think><answer>red</answer>"},
        {"response": "<think>the circle is red</think><answer>red</answer>"},
        {"response": "<think>the circle is blue</think><answer>blue</answer>"},
        {"response": "<answer>red</answer>"}])
    assert shares == {"evidence": 0.5, "cue": 0.25, "none": 0.25}


def test_claims_document_is_strict_json_and_its_table_shows_every_verdict():
    c = claims.Claim("x", "conflict_accuracy", "test_ood", "faithful_mr1", "anchoring_grpo")
    one_seed = claims.Claim("y", "conflict_accuracy", "test_ood", "a", "b")
    doc = claims.json_safe({"seeds": [0, 1, 2], "claims": [
        claims.compare(TABLE, c, [0, 1, 2]),
        claims.compare([_entry("a", [1.0]), _entry("b", [0.0])], one_seed, [0])]})
    assert doc["claims"][1]["ci95"] == [None, None]  # NaN is not JSON
    table = claims.claims_markdown(doc)
    assert table.count("**inconclusive**") == 2 and "[–, –]" in table and "+0.20" in table


def test_study_claims_cover_the_issue_list_and_the_efficiency_points():
    ep = config.load_params(config.EvalParams, {"efficiency_prompts": [8, 32]})
    keys = {(c.a, c.b, c.metric, c.split) for c in ablation.study_claims(ep)}
    assert ("anchoring", "text_perception", "focus_mass", "test_ood") in keys
    assert ("anchoring", "plain_sft", "conflict_accuracy", "test_ood") in keys
    assert ("faithful_mr1", "anchoring_grpo", "conflict_accuracy", "test_ood") in keys
    assert ("faithful_mr1", "anchoring_grpo", "faithfulness_gap", "test_ood") in keys
    assert ("faithful_mr1_occlusion", "anchoring_grpo", "conflict_accuracy", "test_ood") in keys
    assert ("plain_faithful", "plain_grpo", "conflict_accuracy", "test_ood") in keys
    for k in (8, 32):
        assert (f"faithful_mr1_p{k}", f"anchoring_grpo_p{k}", "accuracy", "test_ood") in keys
    # No comparison twice: on test_ood accuracy is conflict accuracy, and the data-efficiency
    # claim at all prompts is the off-distribution one.
    pairs = [(a, b, "accuracy" if m == "conflict_accuracy" and s == "test_ood" else m, s)
             for a, b, m, s in keys]
    assert len(pairs) == len(set(pairs))
    # Every faithful-use claim names the preconditions it needs.
    for c in ablation.study_claims(ep):
        if c.a in ablation.FAITHFUL_ROWS:
            assert {f"faithful_reward_validity:{c.a}", f"start_reading_spread:{c.a}",
                    f"within_group_reading_spread:{c.a}"} <= set(c.requires)


def test_a_claim_whose_precondition_fails_reads_as_untestable():
    rec = claims.compare(TABLE, claims.Claim("x", "conflict_accuracy", "test_ood", "faithful_mr1",
                                             "anchoring_grpo", ("faithful_reward_validity:faithful_mr1",)),
                         [0, 1, 2])
    pre = {"faithful_reward_validity": {"faithful_mr1": {"holds": False}}}
    (out,) = claims.apply_preconditions([rec], pre)
    assert out["verdict"] == "inconclusive" and out["status"] == "untestable"
    assert out["preconditions"] == {"faithful_reward_validity:faithful_mr1": False}
    (ok,) = claims.apply_preconditions(
        [rec], {"faithful_reward_validity": {"faithful_mr1": {"holds": True}}})
    assert ok["status"] == ok["verdict"]


def test_validity_and_spread_summaries_from_stage2_logs():
    logs = [[{"reward_reading_spearman": 0.4, "reward_reading_groups": 3, "reward_reading_positive": 1.0,
              "reading_cue_share": 0.5},
             {"reward_reading_spearman": None, "reward_reading_groups": 0, "reading_cue_share": 0.3}],
            [{"reward_reading_spearman": 0.2, "reward_reading_groups": 1, "reward_reading_positive": 1.0,
              "reading_cue_share": 0.1}],
            [{"reward_reading_spearman": 0.3, "reward_reading_groups": 2, "reward_reading_positive": 0.5,
              "reading_cue_share": 0.0}]]
    v = claims.validity_summary(logs)
    assert v["seed_values"] == pytest.approx([0.4, 0.2, 0.3])
    assert v["positive_share"] == pytest.approx((3 + 1 + 1) / 6)
    assert v["holds"] == (v["ci95"][0] > 0)
    s = claims.spread_summary(logs)
    assert s["seed_values"] == pytest.approx([0.4, 0.1, 0.0]) and not s["holds"]


def test_efficiency_rows_join_the_table_under_their_own_keys():
    summ = {m: {"mean": 0.5, "lo": 0.4, "hi": 0.6, "n": 10} for m in ablation.evaluation.METRICS}
    points = [{"variant": "faithful", "seed": s, "n_prompts": 8, "summary": summ} for s in (0, 1)]
    points.append({"variant": "faithful", "seed": 0, "n_prompts": 0, "summary": summ})
    long = ablation.efficiency_long(points)
    assert {e["row"] for e in long} == {"faithful_mr1_p8"}
    assert {e["split"] for e in long} == {"test_ood"}
    assert all(e["n_seeds"] == 2 for e in long)
    # The markdown table shows the ablation's rows only; the CSV keeps every row.
    assert "faithful_mr1_p8" not in ablation.table_markdown(long, ["test_ood"])
    assert "faithful_mr1_p8" in ablation.table_csv(long)
