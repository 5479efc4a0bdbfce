"""Figures (``fmr1lib.plotting``, ``fmr1lib.study_plots``) outside a kernel, and notebook 05's
generated closing section.

Inline display inside a Jupyter kernel is checked by ``notebooks/test_executed_notebooks.py``.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from fmr1lib import claims, plotting, study_plots  # noqa: E402


def test_every_saved_figure_has_a_pdf_beside_the_png_and_is_not_shown_outside_a_kernel(tmp_path):
    fig = plotting.fig_training_curves({"plain": [{"step": i, "ce": 1 / (i + 1)} for i in range(30)]},
                                       ["ce"], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "curve.pdf").read_bytes()[:5] == b"%PDF-"
    assert plotting.show(fig) is False  # no kernel: nothing displayed, the figure stays open


def test_theme_keeps_the_interactive_flag_set_inside_it():
    before = matplotlib.rcParams["interactive"]
    try:
        matplotlib.rcParams["interactive"] = False
        with plotting.theme():
            matplotlib.interactive(True)  # what the inline backend's hook does on the first figure
        assert matplotlib.rcParams["interactive"] is True
    finally:
        matplotlib.rcParams["interactive"] = before


def test_long_curves_are_smoothed_short_ones_are_not():
    ys = np.arange(100, dtype=float)
    assert np.allclose(plotting.smooth(ys, 1), ys)
    assert np.allclose(plotting.smooth(ys, 10)[9:], ys[9:] - 4.5)
    assert plotting._smooth_window(plotting.SMOOTH_POINTS) == 1
    assert plotting._smooth_window(100) == 10


def test_data_efficiency_axis_is_ticked_at_the_prompt_counts():
    points = [{"variant": v, "prompts": k, "accuracy": 0.5} for v in ("grpo", "faithful")
              for k in (8, 32, 160)]
    ax = study_plots.fig_data_efficiency(points).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "32", "160"]


def test_one_question_family_draws_no_single_bar_panel():
    tasks = {"train": {"color": 10}, "test_ood": {"color": 4}}
    answers = {"train": {"red": 6, "blue": 4}, "test_ood": {"red": 2, "blue": 2}}
    fig = plotting.fig_data_summary(tasks, answers, {"train": 0.9, "test_ood": 0.0})
    titles = [ax.get_title() for ax in fig.axes]
    assert "question families" not in titles and "answers (every question: color)" in titles
    tasks["train"]["count"] = 5
    fig = plotting.fig_data_summary(tasks, answers, {"train": 0.9, "test_ood": 0.0})
    assert "question families" in [ax.get_title() for ax in fig.axes]


def test_sft_and_grpo_rows_have_distinct_colours():
    """The two SFT baselines and the two GRPO rows were near-identical oranges and blues: each
    pair must now differ in hue or clearly in lightness."""
    for a, b in (("plain", "text_perception"), ("grpo_backbone", "anchoring_grpo")):
        ha, _, va = matplotlib.colors.rgb_to_hsv(matplotlib.colors.to_rgb(plotting.color_of(a)))
        hb, _, vb = matplotlib.colors.rgb_to_hsv(matplotlib.colors.to_rgb(plotting.color_of(b)))
        assert abs(ha - hb) > 0.08 or abs(va - vb) > 0.25, (a, b)


def _doc(holds=True, seeds=(0, 1, 2)):
    return {"profile": "tiny", "seeds": list(seeds),
            "preconditions": {"split": "test_ood",
                              "rl_answer_change": {"anchoring_grpo": {
                                  "start": "anchoring", "mean": 0.1, "seed_values": [0.1] * len(seeds),
                                  "threshold": 0.05, "holds": holds}}},
            "claims": [{"claim": "anchoring helps", "metric": "focus_mass", "split": "test_ood",
                        "a": "anchoring", "b": "plain_sft", "diff_mean": 0.5, "ci95": [0.3, 0.7],
                        "n_seeds": len(seeds), "verdict": "supported", "seed_diffs": [0.5] * len(seeds)}]}


def _long(backbone_mass):
    return [{"row": "backbone", "split": "test_id", "metric": "focus_mass", "mean": backbone_mass},
            {"row": "anchoring", "split": "test_id", "metric": "focus_mass", "mean": 0.98}]


def test_results_section_reads_the_numbers():
    text = claims.results_markdown(_doc(), _long(0.06), plotting.DISPLAY_NAMES)
    assert text.startswith("## What the results say")
    assert "All 1 hold" in text and "1 supported, 0 refuted, 0 inconclusive" in text
    assert "is the no-anchoring baseline here" in text
    perceiving = claims.results_markdown(_doc(), _long(0.97), plotting.DISPLAY_NAMES)
    assert "already perceives on this profile" in perceiving and "not a no-anchoring baseline" in perceiving
    failed = claims.results_markdown(_doc(holds=False, seeds=(0,)), [], plotting.DISPLAY_NAMES)
    assert "1 of 1 do not hold" in failed and "not tested by this run" in failed
    assert "with one seed there is no interval" in failed
