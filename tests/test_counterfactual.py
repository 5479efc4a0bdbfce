"""Tests for fmr1lib.counterfactual: image interventions and control regions."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from PIL import Image

from fmr1lib import counterfactual
from fmr1lib.counterfactual import (
    METHODS,
    boxes_overlap,
    control_boxes,
    estimate_background,
    intervene,
)

BACKGROUND = (200, 220, 240)
OBJECT = (220, 30, 30)
# The object fills (20, 10)-(36, 26); the box leaves a margin so blur mixes object and background.
OBJECT_BOX = (20, 10, 36, 26)
BOX = (16.0, 6.0, 40.0, 30.0)


@pytest.fixture
def scene() -> Image.Image:
    image = Image.new("RGB", (64, 48), BACKGROUND)
    image.paste(OBJECT, OBJECT_BOX)
    return image


def region_mask(shape: tuple[int, int], c0: int, r0: int, c1: int, r1: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[max(r0, 0) : r1, max(c0, 0) : c1] = True
    return mask


def test_doctests() -> None:
    result = doctest.testmod(counterfactual)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("method", METHODS)
def test_intervene_returns_new_image_and_never_mutates_input(scene, method) -> None:
    before = scene.tobytes()
    out = intervene(scene, [BOX], method, seed=1)
    assert out is not scene
    assert out.size == scene.size and out.mode == "RGB"
    assert scene.tobytes() == before
    assert out.tobytes() != before


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("method", METHODS)
def test_only_pixels_inside_the_padded_box_change(scene, method, pad) -> None:
    src = np.asarray(scene)
    out = np.asarray(intervene(scene, [BOX], method, seed=5, pad=pad))
    inside = region_mask(src.shape[:2], 16 - pad, 6 - pad, 40 + pad, 30 + pad)
    assert np.array_equal(out[~inside], src[~inside])
    changed = np.any(out != src, axis=-1)
    obj = region_mask(src.shape[:2], *OBJECT_BOX)
    if method == "blur":
        # Blur keeps the object's core colour but must smear its edges.
        assert changed[inside].sum() > 20
    else:
        assert changed[obj].all()


def test_fractional_box_covers_partly_covered_pixels(scene) -> None:
    out = np.asarray(intervene(scene, [(20.5, 10.5, 35.2, 25.1)], "mask"))
    assert (out[10:26, 20:36] == (127, 127, 127)).all()
    src = np.asarray(scene)
    assert np.array_equal(out[:, 36:], src[:, 36:])
    assert np.array_equal(out[26:], src[26:])


def test_background_fills_with_border_colour(scene) -> None:
    assert estimate_background(scene) == BACKGROUND
    out = np.asarray(intervene(scene, [BOX], "background"))
    assert (out[6:30, 16:40] == BACKGROUND).all()
    # The object is gone: the image equals the empty background scene.
    assert (out == BACKGROUND).all()
    out_fill = np.asarray(intervene(scene, [BOX], "background", fill=(1, 2, 3)))
    assert (out_fill[6:30, 16:40] == (1, 2, 3)).all()


def test_mask_default_grey_and_custom_fill(scene) -> None:
    assert (np.asarray(intervene(scene, [BOX], "mask"))[6:30, 16:40] == 127).all()
    out = np.asarray(intervene(scene, [BOX], "mask", fill=(0, 255, 0)))
    assert (out[6:30, 16:40] == (0, 255, 0)).all()


def test_noise_is_seeded(scene) -> None:
    a = intervene(scene, [BOX], "noise", seed=7).tobytes()
    b = intervene(scene, [BOX], "noise", seed=7).tobytes()
    c = intervene(scene, [BOX], "noise", seed=8).tobytes()
    assert a == b
    assert a != c


def test_multiple_boxes_and_clipping(scene) -> None:
    out = np.asarray(intervene(scene, [(0, 0, 4, 4), (60, 44, 80, 60)], "mask", fill=(9, 9, 9)))
    assert (out[0:4, 0:4] == 9).all()
    assert (out[44:48, 60:64] == 9).all()
    src = np.asarray(scene)
    inside = region_mask(src.shape[:2], 0, 0, 4, 4) | region_mask(src.shape[:2], 60, 44, 64, 48)
    assert np.array_equal(out[~inside], src[~inside])


def test_empty_boxes_return_an_unchanged_copy(scene) -> None:
    out = intervene(scene, [], "noise")
    assert out is not scene
    assert out.tobytes() == scene.tobytes()


def test_non_rgb_input_gives_rgb(scene) -> None:
    gray = scene.convert("L")
    out = intervene(gray, [BOX], "mask")
    assert out.mode == "RGB"
    assert gray.mode == "L"


def test_unknown_method_names_method_and_allowed(scene) -> None:
    with pytest.raises(ValueError, match=r"'inpaint'.*mask, background, blur, noise"):
        intervene(scene, [BOX], "inpaint")


@pytest.mark.parametrize(
    "box",
    [(10, 5, 8, 20), (10, 5, 10, 20), (10, 20, 30, 20), (70, 0, 90, 10), (-30, -30, -1, -1)],
)
def test_bad_box_raises_naming_the_box(scene, box) -> None:
    before = scene.tobytes()
    with pytest.raises(ValueError, match=str(box[0])) as err:
        intervene(scene, [BOX, box], "mask")
    assert repr(tuple(box)) in str(err.value)
    assert scene.tobytes() == before


def test_boxes_overlap_is_symmetric_and_pixel_based() -> None:
    assert boxes_overlap((0, 0, 10, 10), (9, 9, 20, 20))
    assert not boxes_overlap((0, 0, 10, 10), (0, 10, 10, 20))
    assert boxes_overlap((0, 0, 10, 10.1), (0, 10, 10, 20))
    for a, b in [((0, 0, 5, 5), (3, 3, 8, 8)), ((0, 0, 5, 5), (5, 0, 8, 5))]:
        assert boxes_overlap(a, b) == boxes_overlap(b, a)


def test_control_boxes_properties() -> None:
    size = (112, 112)
    evidence = [(10.0, 10.0, 34.0, 30.0), (60.5, 50.0, 80.0, 90.25)]
    avoid = [(84.0, 0.0, 112.0, 28.0)]
    boxes = control_boxes(size, evidence, np.random.default_rng(0), avoid=avoid)
    assert len(boxes) == len(evidence)
    for control, ev in zip(boxes, evidence, strict=True):
        assert control[2] - control[0] == pytest.approx(ev[2] - ev[0])
        assert control[3] - control[1] == pytest.approx(ev[3] - ev[1])
        assert control[0] >= 0 and control[1] >= 0
        assert control[2] <= size[0] and control[3] <= size[1]
        for other in (*evidence, *avoid):
            assert not boxes_overlap(control, other)
    assert not boxes_overlap(boxes[0], boxes[1])
    # A control view is then a valid intervention that leaves the evidence untouched.
    image = Image.new("RGB", size, BACKGROUND)
    out = np.asarray(intervene(image, boxes, "noise"))
    assert (out[10:30, 10:34] == BACKGROUND).all()


def test_control_boxes_deterministic_for_seeded_rng() -> None:
    evidence = [(5, 5, 25, 25), (40, 40, 60, 60), (70, 10, 90, 20)]
    a = control_boxes((100, 100), evidence, np.random.default_rng(42))
    b = control_boxes((100, 100), evidence, np.random.default_rng(42))
    c = control_boxes((100, 100), evidence, np.random.default_rng(43))
    assert a == b
    assert a != c


def test_control_boxes_empty_evidence() -> None:
    assert control_boxes((50, 50), [], np.random.default_rng(0)) == []


def test_control_boxes_raise_when_nothing_fits() -> None:
    with pytest.raises(ValueError, match=r"90x90.*100x100"):
        control_boxes((100, 100), [(5, 5, 95, 95)], np.random.default_rng(0), max_tries=50)
    with pytest.raises(ValueError, match=r"120x10.*100x100.*larger than the image"):
        control_boxes((100, 100), [(0, 0, 120, 10)], np.random.default_rng(0))


# --------------------------------------------------------------------------------------
# The reward's I' edits only the cells whose attention the reward scores
# --------------------------------------------------------------------------------------


def _edited_outside_scored_cells(row, region, image) -> bool:
    """Whether ``image`` (an I' of ``row``) differs from the original in a cell that the
    reward's ``region_token_mask`` does not count as inside ``region``."""
    from fmr1lib import faithful, modeling

    before = np.asarray(row["image"].convert("RGB"), dtype=np.int16)
    after = np.asarray(image.convert("RGB"), dtype=np.int16)
    h, w = before.shape[:2]
    thw = (1, h // 14, w // 14)  # FocusShapes sizes are multiples of 28: no resize
    scored = modeling.boxes_to_grid(region, (w, h), thw).numpy() > faithful.REGION_EPS
    ys, xs = np.nonzero((before != after).any(-1))
    return bool((~scored[ys // modeling.CELL, xs // modeling.CELL]).any())


@pytest.fixture(scope="module")
def shapes_rows():
    from fmr1lib import config, data

    p = config.load_params(config.DataParams)
    return [data.make_example(p, "train", i) for i in range(200)]


@pytest.mark.parametrize("method", ["background", "mask", "noise", "blur"])
def test_reward_intervention_stays_in_the_scored_cells(shapes_rows, method):
    """I' used to grow the region by 1 px, editing neighbouring cells (55 of 200 evidence
    examples with noise / blur); now the edited pixels are the region's."""
    from fmr1lib import faithful

    regions = [r["evidence_boxes"] for r in shapes_rows]
    images = faithful.counterfactual_images(shapes_rows, regions, method)
    assert not [r["id"] for r, reg, im in zip(shapes_rows, regions, images, strict=True)
                if _edited_outside_scored_cells(r, reg, im)]
    assert any(np.asarray(im).tobytes() != np.asarray(r["image"]).tobytes()
               for r, im in zip(shapes_rows, images, strict=True))
    # The check can fail: the old 1 px padding trips it for the methods that change background.
    grown = [counterfactual.intervene(r["image"], reg, method, pad=1, **faithful.intervention_kwargs(r))
             for r, reg in zip(shapes_rows, regions, strict=True)]
    bad = sum(_edited_outside_scored_cells(r, reg, im)
              for r, reg, im in zip(shapes_rows, regions, grown, strict=True))
    if method in ("noise", "blur"):
        assert bad > 0


def test_occlusion_cells_are_edited_alone(shapes_rows):
    from fmr1lib import faithful

    row = shapes_rows[0]
    w, h = row["image"].size
    for method in ("background", "noise"):
        for box in faithful.cell_boxes((w, h), (1, h // 14, w // 14)):
            im = faithful.counterfactual_images([row], [[box]], method)[0]
            assert not _edited_outside_scored_cells(row, [box], im)
