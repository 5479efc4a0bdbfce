"""Tests of fmr1lib.prompting: parsing, format checks, think/response texts and the prompt.

Comparing answers is fmr1lib.scoring's job; its table of cases is in tests/test_scoring.py.
"""

from __future__ import annotations

import re

import pytest

from fmr1lib import config, data, modeling, prompting, scoring
from fmr1lib.prompting import (
    is_well_formed,
    normalise,
    parse_answer,
    prompt_text,
    response_text,
    think_text,
)

ALL_FAMILIES = {"color": 1.0, "shape": 1.0, "count": 1.0, "relation": 1.0, "exists": 1.0}
N_EXAMPLES = 50


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    p = config.load_params(config.DataParams, tasks=ALL_FAMILIES)
    return [data.make_example(p, "train", i) for i in range(N_EXAMPLES)]


@pytest.fixture(scope="module")
def processor():
    tokenizer = modeling.build_tokenizer(modeling.tokenizer_corpus())
    return modeling.build_processor(tokenizer, 3136, 12544)


# --------------------------------------------------------------------------------------
# parse_answer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>look at the circle</think><answer>red</answer>", "red"),
        ("<Focus><think>x</think><answer>blue</answer><|im_end|>", "blue"),
        ("<think>x</think><answer>3</answer>", "3"),
        ("<think>x</think><answer>  RED. </answer>", "red"),
        ("<think>x</think><answer>\n Light   Blue \n</answer>", "light blue"),
        ("<ANSWER>Yes</ANSWER>", "yes"),
        ("<answer>red</answer><answer>blue</answer>", "red"),  # the first one counts
        ("no think at all <answer>green</answer>", "green"),  # parsing ignores the format
    ],
)
def test_parse_answer_extracts_normalised_answer(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "<think>no answer</think>",
        "<think>x</think><answer>red",
        "<think>x</think>red</answer>",
        "<think>x</think><answer></answer>",
        "<think>x</think><answer>   </answer>",
        "<think>x</think><answer>.</answer>",
        "</answer>red<answer>",
        "",
        "red",
        "<|im_end|>",
    ],
)
def test_parse_answer_malformed_is_none(text):
    assert parse_answer(text) is None


@pytest.mark.parametrize(
    "value",
    [None, 3, 2.5, b"<answer>red</answer>", ["<answer>red</answer>"], {"answer": "red"}, object()],
)
def test_parse_answer_non_str_never_raises(value):
    assert parse_answer(value) is None
    assert is_well_formed(value) is False


def test_parse_answer_wrong_answer_is_parsed_not_matched():
    pred = parse_answer("<think>x</think><answer>blue</answer>")
    assert pred == "blue"
    assert not scoring.answers_match(pred, "red")


# --------------------------------------------------------------------------------------
# is_well_formed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>b</answer>",
        "<Focus><think>a</think><answer>b</answer>",
        "<think>a</think><answer>b</answer><|im_end|>",
        "<think>a</think><answer>b</answer><|endoftext|>",
        "<think>a</think><answer>b</answer><|im_end|><|endoftext|><|endoftext|>",
        "  <think>a</think>\n<answer>b</answer>\n",
        "<think></think><answer>b</answer>",  # an empty think is allowed
        "<Focus> the red triangle, top left<think>a</think><answer>red</answer>",
    ],
)
def test_is_well_formed_accepts(text):
    assert is_well_formed(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<answer>b</answer>",  # missing think
        "<think>a</think>",  # missing answer
        "<think>a</think><answer></answer>",  # empty answer
        "<answer>b</answer><think>a</think>",  # wrong order
        "<think>a<think>b</think></think><answer>c</answer>",  # nested junk
        "<think>a</think><answer>b<answer>c</answer></answer>",
        "<think>a</think><answer>b</answer><answer>c</answer>",  # two answers
        "<think>a</think><answer>b</answer> and more text",
        "<think>a</think><answer>b</answer><|im_end|> trailing",
        "<Focus><Focus><think>a</think><answer>b</answer>",
        "<think>a</think><answer>b",
        "<think>a<answer>b</answer>",
    ],
)
def test_is_well_formed_rejects(text):
    assert not is_well_formed(text)


# --------------------------------------------------------------------------------------
# normalise (the parsed answer's display form)
# --------------------------------------------------------------------------------------


def test_normalise():
    assert normalise("  Light  Blue. ") == "light blue"
    assert normalise("YES") == "yes"


# --------------------------------------------------------------------------------------
# think_text and response_text on FocusShapes questions
# --------------------------------------------------------------------------------------


def test_examples_cover_all_families(examples):
    assert {e["meta"]["task"] for e in examples} == set(ALL_FAMILIES)


def test_think_text_never_contains_the_answer(examples):
    for e in examples:
        think = think_text(e["question"])
        assert think.startswith("look at ")
        # Every FocusShapes question matches a pattern: no fallback.
        assert think != "look at the image", e["question"]
        assert not re.search(rf"\b{re.escape(normalise(e['answer']))}\b", think.lower()), (
            e["meta"]["task"],
            e["question"],
            e["answer"],
            think,
        )
        assert "<" not in think  # no tags inside the reasoning


def test_think_text_examples():
    assert think_text("What color is the circle?") == "look at the circle"
    assert think_text("What shape is the red object?") == "look at the red object"
    assert think_text("How many blue shapes are there?") == "look at the blue shapes"
    assert (
        think_text("Is the square left of the triangle?") == "look at the square and the triangle"
    )
    assert think_text("Is there a green diamond?") == "look at a green diamond"
    assert think_text("  what COLOR is the circle  ") == "look at the circle"
    assert think_text("Describe the picture.") == "look at the image"
    assert think_text("") == "look at the image"


def test_response_text_format():
    assert (
        response_text("red", "look at the circle")
        == "<think>look at the circle</think><answer>red</answer>"
    )
    assert response_text("3") == "<think></think><answer>3</answer>"
    with_perception = response_text("red", "look at the circle", "the red circle, top left")
    assert (
        with_perception
        == " the red circle, top left<think>look at the circle</think><answer>red</answer>"
    )
    for text in (response_text("red", "x"), with_perception):
        assert prompting.FOCUS not in text  # <Focus> belongs to the prompt
        assert is_well_formed(prompting.FOCUS + text)
        for tag in prompting.TAG_TOKENS[1:]:
            assert text.count(tag) == 1


def test_response_round_trips_every_example(examples):
    for e in examples:
        resp = response_text(e["answer"], think_text(e["question"]))
        assert is_well_formed(resp + "<|im_end|>")
        assert parse_answer(resp) == normalise(e["answer"])
        assert scoring.answers_match(parse_answer(resp), e["answer"], e["answer_type"],
                                     e["choices"])


# --------------------------------------------------------------------------------------
# prompt_text
# --------------------------------------------------------------------------------------


def test_prompt_text_structure(processor):
    question = "What color is the circle?"
    text = prompt_text(processor, question)
    assert text.endswith("<|im_start|>assistant\n" + prompting.FOCUS)
    assert text.count(prompting.FOCUS) == 1
    assert text.count(question) == 1
    assert text.count("<|image_pad|>") == 1
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    # The image comes before the question, inside the user turn.
    user = text.index("<|im_start|>user")
    assert user < text.index("<|image_pad|>") < text.index(question)
    assert text.startswith("<|im_start|>system\n" + prompting.SYSTEM_PROMPT)
    for tag in prompting.TAG_TOKENS[1:]:
        assert tag not in text


def test_prompt_text_without_system(processor):
    text = prompt_text(processor, "Is there a red square?", system=None)
    assert "<|im_start|>system" not in text
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    assert text.endswith(prompting.FOCUS)


def test_prompt_and_response_tokenise_additively(processor, examples):
    # Labels are placed by counting response tokens from the end, so tokenising the
    # concatenation must give the prompt's tokens followed by the response's.
    tok = processor.tokenizer
    focus_id = tok.convert_tokens_to_ids(prompting.FOCUS)
    for e in examples[:10]:
        prompt = prompt_text(processor, e["question"])
        resp = response_text(e["answer"], think_text(e["question"])) + "<|im_end|>"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(resp, add_special_tokens=False)["input_ids"]
        assert tok(prompt + resp, add_special_tokens=False)["input_ids"] == p_ids + r_ids
        assert p_ids[-1] == focus_id


def test_both_routes_tokenise_word_level_within_two_tokens(examples, processor):
    """The tokenizer's corpus holds both routes' texts: every word is one token, and the two
    routes of a record differ by at most two tokens (the cue route was spelled one character
    at a time: 20 tokens against 10)."""
    tok = processor.tokenizer
    for ex in examples:
        meta = ex["meta"]
        kind = meta["cue_kind"] if meta["cue_kind"] != "none" else "color_patch"
        cue_value = meta["shortcut_value"] or ex["answer"]
        routes = [prompting.route_think(ex["question"], ex["answer"], "evidence"),
                  prompting.route_think(ex["question"], ex["answer"], "cue", cue_value, kind)]
        lengths = []
        for text in routes:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text.split()), (text, [tok.decode([i]) for i in ids])
            lengths.append(len(ids))
        assert abs(lengths[0] - lengths[1]) <= 2, routes
