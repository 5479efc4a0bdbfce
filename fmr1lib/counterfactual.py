"""Counterfactual image interventions: remove the evidence, or a control region of the same size.

Paper step: the *reinforcing* stage (counterfactual image intervention). The evidence region of
an example is removed from the image, which shows where vision causally matters; the same
intervention applied to a *control* region of equal size, away from the evidence, is the baseline
that separates "the answer depends on the evidence" from "the answer breaks under any edit".
``05_evaluation`` uses both views for the faithfulness gap (evidence-intervened accuracy drop minus
control-intervened drop), and the faithful reward of ``faithful.py`` uses the evidence view.

Boxes are ``(x0, y0, x1, y1)`` in original-pixel coordinates with the half-open pixel convention:
a box covers pixel columns ``floor(x0) .. ceil(x1) - 1`` and rows ``floor(y0) .. ceil(y1) - 1``,
so a fractional edge counts the partly covered pixel as inside (an intervention must not leave a
sliver of evidence visible).

Methods (``METHODS``):

- ``mask``: a constant colour (default mid grey), the classic occlusion.
- ``background``: the scene's background colour (the most common border colour), an inpainting
  stand-in that removes the object without adding a new grey patch the model could read as one.
- ``blur``: Gaussian blur of the box content; a weak intervention (colour survives, shape does not).
- ``noise``: uniform random RGB noise from a seeded generator.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from fmr1lib.choices import Intervention, options

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in original-pixel coordinates, ``x1 > x0`` and ``y1 > y0``."""

METHODS = options(Intervention)

DEFAULT_MASK_FILL = (127, 127, 127)


def box_pixels(box: Sequence[float]) -> tuple[int, int, int, int]:
    """Integer pixel bounds ``(c0, r0, c1, r1)`` (half-open) covered by ``box``, not clipped.

    Args:
        box: ``(x0, y0, x1, y1)`` in pixel coordinates.

    Returns:
        ``(floor(x0), floor(y0), ceil(x1), ceil(y1))``: columns ``c0..c1-1``, rows ``r0..r1-1``.

    >>> box_pixels((2.5, 3.0, 7.2, 9.0))
    (2, 3, 8, 9)
    """
    x0, y0, x1, y1 = box
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def boxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two boxes share at least one pixel (half-open pixel convention).

    Boxes that only touch along an edge do not overlap; fractional edges count the partly
    covered pixel, so ``(0, 0, 10.5, 10)`` and ``(10.2, 0, 20, 10)`` overlap on column 10.

    Args:
        a: ``(x0, y0, x1, y1)``.
        b: ``(x0, y0, x1, y1)``.

    Returns:
        True when the pixel sets of ``a`` and ``b`` intersect.

    >>> boxes_overlap((0, 0, 10, 10), (5, 5, 15, 15))
    True
    >>> boxes_overlap((0, 0, 10, 10), (10, 0, 20, 10))
    False
    >>> boxes_overlap((0, 0, 10.5, 10), (10.2, 0, 20, 10))
    True
    """
    ac0, ar0, ac1, ar1 = box_pixels(a)
    bc0, br0, bc1, br1 = box_pixels(b)
    return ac0 < bc1 and bc0 < ac1 and ar0 < br1 and br0 < ar1


def estimate_background(image: Image.Image) -> tuple[int, int, int]:
    """The most common colour among the image's border pixels.

    Scenes (FocusShapes, most photos of objects) rarely put the evidence on the border, so the
    border's mode is the colour that "no object here" looks like.

    Args:
        image: any PIL image; converted to RGB.

    Returns:
        ``(r, g, b)`` of the most common border colour (ties: the one seen first, top row first).

    >>> estimate_background(Image.new("RGB", (8, 6), (10, 20, 30)))
    (10, 20, 30)
    """
    arr = np.asarray(image.convert("RGB"))
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]], axis=0)
    counts = Counter(map(tuple, border.tolist()))
    r, g, b = counts.most_common(1)[0][0]
    return int(r), int(g), int(b)


def _pixel_region(
    box: Sequence[float], size: tuple[int, int], pad: int
) -> tuple[int, int, int, int]:
    """Validate ``box`` and return its padded pixel bounds clipped to ``size`` (width, height)."""
    if len(box) != 4:
        raise ValueError(f"box {tuple(box)!r} must have 4 coordinates (x0, y0, x1, y1)")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {tuple(box)!r} has a non-finite coordinate")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)!r} is empty: need x1 > x0 and y1 > y0")
    width, height = size
    c0, r0, c1, r1 = box_pixels((x0, y0, x1, y1))
    c0, r0, c1, r1 = c0 - pad, r0 - pad, c1 + pad, r1 + pad
    c0, r0 = max(c0, 0), max(r0, 0)
    c1, r1 = min(c1, width), min(r1, height)
    if c1 <= c0 or r1 <= r0:
        raise ValueError(f"box {tuple(box)!r} lies entirely outside the {width}x{height} image")
    return c0, r0, c1, r1


def intervene(
    image: Image.Image,
    boxes: Sequence[Box],
    method: str = "background",
    *,
    seed: int = 0,
    fill: tuple[int, int, int] | None = None,
    blur_radius: float = 6.0,
    pad: int = 0,
) -> Image.Image:
    """Remove the content of ``boxes`` from ``image`` with one intervention method.

    Only pixels inside the (padded, clipped) boxes change; every other pixel is kept byte for
    byte, so any change in the model's answer is attributable to the intervened region.

    Args:
        image: input image (any mode; the result is RGB). Never modified.
        boxes: boxes ``(x0, y0, x1, y1)`` in original-pixel coordinates. Boxes partly outside the
            image are clipped; a box entirely outside raises.
        method: one of ``METHODS``.
        seed: seed of ``numpy.random.default_rng`` for ``noise`` (the same seed gives the same
            image); store it with the example so the view can be rebuilt.
        fill: colour for ``mask`` (default mid grey) and ``background`` (default: the border
            colour from ``estimate_background``).
        blur_radius: Gaussian radius in pixels for ``blur``.
        pad: grow every box by this many pixels on each side before intervening, to cover
            anti-aliased edges of the evidence.

    Returns:
        A new RGB image of the same size.

    Raises:
        ValueError: unknown ``method``, negative ``pad``, or a box that is empty
            (``x1 <= x0`` or ``y1 <= y0``) or entirely outside the image.
    """
    if method not in METHODS:
        raise ValueError(f"unknown intervention method {method!r}; allowed: {', '.join(METHODS)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    # convert() always returns a new image (a copy for RGB input), so the caller's image is safe.
    out = image.convert("RGB")
    # Validate every box before touching pixels, so a bad box never yields a half-edited image.
    regions = [_pixel_region(box, out.size, pad) for box in boxes]
    if not regions:
        return out

    if method == "mask":
        colour = tuple(fill) if fill is not None else DEFAULT_MASK_FILL
    elif method == "background":
        colour = tuple(fill) if fill is not None else estimate_background(image)
    rng = np.random.default_rng(seed) if method == "noise" else None

    for c0, r0, c1, r1 in regions:
        if method in ("mask", "background"):
            out.paste(colour, (c0, r0, c1, r1))
        elif method == "blur":
            crop = out.crop((c0, r0, c1, r1))
            out.paste(crop.filter(ImageFilter.GaussianBlur(blur_radius)), (c0, r0))
        else:
            assert rng is not None
            noise = rng.integers(0, 256, size=(r1 - r0, c1 - c0, 3), dtype=np.uint8)
            out.paste(Image.fromarray(noise, mode="RGB"), (c0, r0))
    return out


def control_boxes(
    image_size: tuple[int, int],
    evidence_boxes: Sequence[Box],
    rng: np.random.Generator,
    *,
    avoid: Sequence[Box] = (),
    max_tries: int = 200,
    accept: Callable[[Box], bool] | None = None,
) -> list[Box]:
    """Control regions: one box per evidence box, same size, disjoint from all evidence.

    Rejection sampling over integer top-left positions: a candidate is accepted when it lies
    inside the image and shares no pixel (``boxes_overlap``) with any evidence box, any box in
    ``avoid`` (e.g. a shortcut cue that must stay visible) or any control box chosen before it.

    Args:
        image_size: ``(width, height)`` in pixels.
        evidence_boxes: boxes ``(x0, y0, x1, y1)`` whose sizes the control boxes copy.
        rng: numpy generator; the result is a function of its state.
        avoid: further boxes the control boxes must not touch.
        max_tries: candidates drawn per evidence box before giving up.
        accept: optional further test of a candidate (e.g. that intervening on it changes
            pixels: a control on blank background tests nothing).

    Returns:
        A list of ``len(evidence_boxes)`` boxes ``(x, y, x + w, y + h)`` as float tuples.

    Raises:
        ValueError: when a box of some evidence box's size cannot be placed (larger than the
            image, or no free position found within ``max_tries``).
    """
    width, height = image_size
    taken: list[Sequence[float]] = [*evidence_boxes, *avoid]
    chosen: list[Box] = []
    for box in evidence_boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0:
            raise ValueError(f"evidence box {tuple(box)!r} is empty: need x1 > x0 and y1 > y0")
        max_x, max_y = math.floor(width - w), math.floor(height - h)
        if max_x < 0 or max_y < 0:
            raise ValueError(
                f"no control box of size {w:g}x{h:g} fits in the {width}x{height} image: "
                "it is larger than the image"
            )
        for _ in range(max_tries):
            x = int(rng.integers(0, max_x + 1))
            y = int(rng.integers(0, max_y + 1))
            candidate = (float(x), float(y), x + w, y + h)
            if (not any(boxes_overlap(candidate, other) for other in (*taken, *chosen))
                    and (accept is None or accept(candidate))):
                chosen.append(candidate)
                break
        else:
            raise ValueError(
                f"no control box of size {w:g}x{h:g} found in the {width}x{height} image after "
                f"{max_tries} tries: every position overlaps an evidence box, an avoided box or "
                "an earlier control box, or intervening on it changes nothing"
            )
    return chosen
