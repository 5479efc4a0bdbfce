"""Records and completions into model inputs: the one collator every stage and metric uses.

* ``encode_batch``: prompt (+ reference response) and image of each record, left-padded, with
  the response labels, the ``<Focus>`` position and the anchoring target of each sample
  (stages 0-1, the evaluation, the occlusion search);
* ``build_sequences``: prompts + sampled completions (``G`` per prompt; the prompt's image is
  stored once, with ``image_index`` naming each sequence's image) for the teacher-forced
  forwards of stage 2 and the answer-attention metric;
* ``completion_logits`` / ``answer_token_mask``: the logits that predict a completion (each
  distinct image through the vision tower once, ``images_once``), and its answer span;
* ``batch_indices``: which records a training step reads (seeded, resumable, sharded).

Nothing here trains or scores: the stages and metrics above build on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fmr1lib import attention, modeling, prompting, records
from fmr1lib.choices import StageVariant, options

STAGE_VARIANTS = options(StageVariant)
"""Response templates: ``text_perception`` describes the evidence in words after ``<Focus>``."""


# --------------------------------------------------------------------------------------
# Records -> inputs
# --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Model inputs plus what the losses need."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    focus_pos: torch.Tensor
    targets: list[torch.Tensor | None]
    ids: list[str] = field(default_factory=list)
    supports: list[torch.Tensor | None] = field(default_factory=list)
    """Per sample, the image tokens the boxes overlap (``q > 0`` before any smoothing)."""


def record_route(row: dict[str, Any], cue_route_share: float) -> tuple[str, dict[str, Any] | None]:
    """The route of a record's ``two_route`` reference response and its cue (None if it has
    none): ``cue`` for a share ``cue_route_share`` of the records whose cue agrees with the
    answer (chosen by a hash of the id, so the same in every epoch and process), ``evidence`` for
    all others (no cue, or a cue that contradicts the answer: a reference response is never
    wrong). The record's ``meta`` is decoded once."""
    cue = (records.decode_meta(row["meta"]) if row.get("meta") else {}).get("cue")
    if cue is None or str(cue.get("value")) != str(row["answer"]):
        return "evidence", cue
    chosen = prompting.route_choice(str(row.get("id", "")), cue_route_share)
    return ("cue" if chosen else "evidence"), cue


def reference_think(row: dict[str, Any], reasoning: str = "look",
                    cue_route_share: float = 0.5) -> str:
    """The reasoning text of a record's reference response (``prompting.REASONINGS``)."""
    if reasoning == "look":
        return prompting.think_text(row["question"],
                                    prompting.think_variant(str(row.get("id", ""))))
    if reasoning != "two_route":
        raise ValueError(f"unknown reasoning {reasoning!r}; use one of {prompting.REASONINGS}")
    route, cue = record_route(row, cue_route_share)
    if route == "evidence":
        return prompting.route_think(row["question"], row["answer"], "evidence")
    return prompting.route_think(row["question"], row["answer"], "cue", cue["value"],
                                 cue.get("kind", "color_patch"))


def _reference_response(row: dict[str, Any], image: Any, variant: str, reasoning: str,
                        cue_route_share: float) -> str:
    perception = None
    if variant == "text_perception":
        perception = prompting.perception_text(records.decode_meta(row["meta"]), image.size)
    think = reference_think(row, reasoning, cue_route_share)
    return prompting.response_text(row["answer"], think, perception) + "<|im_end|>"


def encode_batch(rows: Sequence[dict[str, Any]], processor: Any, variant: str = "plain",
                 with_response: bool = True, smooth_sigma: float = 0.0,
                 reasoning: str = "look", cue_route_share: float = 0.5) -> Batch:
    """Tokenise prompt (+ response) and image for each record.

    ``reasoning`` and ``cue_route_share`` pick the reference response's reasoning
    (``reference_think``).

    The response tokens (and the closing ``<|im_end|>``) are the only labelled ones; the
    ``<Focus>`` token is the last prompt token. Relies on left padding.

    Returns:
        ``Batch`` with ``labels [B, S]`` (-100 outside responses), ``focus_pos [B]`` and, per
        sample, the target ``q`` over its image tokens (None when it has no evidence boxes).
    """
    if variant not in STAGE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {STAGE_VARIANTS}")
    tok = processor.tokenizer
    images = [r["image"].convert("RGB") for r in rows]
    prompts = [prompting.prompt_text(processor, r["question"]) for r in rows]
    responses = [_reference_response(r, im, variant, reasoning, cue_route_share)
                 if with_response else ""
                 for r, im in zip(rows, images, strict=True)]
    enc = processor(text=[p + s for p, s in zip(prompts, responses, strict=True)], images=images,
                    return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    seq = ids.shape[1]
    labels = torch.full_like(ids, -100)
    focus_id = tok.convert_tokens_to_ids(prompting.FOCUS)
    focus_pos = torch.empty(len(rows), dtype=torch.long)
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    targets: list[torch.Tensor | None] = []
    supports: list[torch.Tensor | None] = []
    for b, resp in enumerate(responses):
        n_resp = len(tok(resp, add_special_tokens=False)["input_ids"]) if resp else 0
        if n_resp:
            labels[b, seq - n_resp:] = ids[b, seq - n_resp:]
        focus_pos[b] = seq - n_resp - 1
        if int(ids[b, focus_pos[b]]) != focus_id:
            raise ValueError(f"record {rows[b].get('id')}: <Focus> not at the end of the prompt "
                             f"(tokenisation of prompt + response is not additive)")
        boxes = [list(bx) for bx in rows[b]["evidence_boxes"]]
        q = support = None
        if boxes:
            thw = enc["image_grid_thw"][b]
            box_q = modeling.boxes_to_grid(boxes, images[b].size, thw).flatten()
            if box_q.sum() > 0 and box_q.numel() == int((ids[b] == image_token_id).sum()):
                support = box_q > 0
                q = (modeling.boxes_to_grid(boxes, images[b].size, thw, smooth_sigma).flatten()
                     if smooth_sigma > 0 else box_q)
        targets.append(q)
        supports.append(support)
    return Batch(inputs=dict(enc), labels=labels, focus_pos=focus_pos, targets=targets,
                 ids=[r.get("id", "") for r in rows], supports=supports)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0,
                  world: int = 1) -> list[int]:
    """The example indices of optimiser step ``step``: seeded epoch permutations, sharded.

    Deterministic in ``(n, batch_size, step, seed)``, so a resumed run sees the same data.

    >>> batch_indices(10, 4, 0, seed=0) == batch_indices(10, 4, 0, seed=0)
    True
    """
    global_bs = batch_size * world
    per_epoch = max(1, n // global_bs)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    chunk = order[k * global_bs:(k + 1) * global_bs]
    return [int(i) for i in chunk[rank::world]]


# --------------------------------------------------------------------------------------
# Prompts + completions -> sequences
# --------------------------------------------------------------------------------------


IMAGE_INDEX = "image_index"
"""Key of sequence inputs whose images are stored once: ``pixel_values`` / ``image_grid_thw``
hold the distinct images, ``image_index[n]`` the image of sequence ``n`` (``images_once``)."""


def repeat_image_inputs(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                        repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each image ``repeats`` times, keeping images of a prompt consecutive.

    ``pixel_values`` concatenates the patches of all images (``t * h * w`` rows per image), so
    it is repeated per image block, not per row. (The layout of ``build_sequences(...,
    share_images=False)``: every sequence carries its own copy through the vision tower.)

    Args:
        pixel_values: ``[sum_i t_i h_i w_i, D]``.
        image_grid_thw: ``[n_images, 3]``.
        repeats: copies per image.

    Returns:
        ``(pixel_values, image_grid_thw)`` for ``n_images * repeats`` images.

    >>> pv, thw = repeat_image_inputs(torch.arange(3.)[:, None], torch.tensor([[1, 1, 1], [1, 1, 2]]), 2)
    >>> pv[:, 0].tolist(), thw[:, 2].tolist()
    ([0.0, 0.0, 1.0, 2.0, 1.0, 2.0], [1, 1, 2, 2])
    """
    counts = image_grid_thw.prod(-1).tolist()
    blocks = torch.split(pixel_values, counts)
    pv = torch.cat([blk for blk in blocks for _ in range(repeats)])
    return pv, image_grid_thw.repeat_interleave(repeats, dim=0)


def sequence_grids(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, 3]``: the image grid of every sequence (one image per sequence), whether the images
    are stored once (``IMAGE_INDEX``) or per sequence."""
    grid = inputs["image_grid_thw"]
    index = inputs.get(IMAGE_INDEX)
    return grid if index is None else grid.index_select(0, index.to(grid.device))


def select_sequences(inputs: dict[str, torch.Tensor], selected: torch.Tensor,
                     pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None,
                     image_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The inputs of the ``selected`` sequences, images stored once.

    Without new images the selected sequences keep theirs (``inputs`` must store its images
    once); with ``pixel_values`` / ``image_grid_thw`` (distinct images) and ``image_index``
    (per selected sequence, its image among them) they get those instead.
    """
    out = {k: v.index_select(0, selected) for k, v in inputs.items()
           if k not in ("pixel_values", "image_grid_thw", IMAGE_INDEX)}
    if pixel_values is None:
        if IMAGE_INDEX not in inputs:
            raise ValueError("select_sequences needs inputs whose images are stored once "
                             f"({IMAGE_INDEX!r}) or new images")
        pixel_values, image_grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
        image_index = inputs[IMAGE_INDEX].index_select(0, selected.to(inputs[IMAGE_INDEX].device))
    device = selected.device
    out["pixel_values"] = pixel_values.to(device, inputs["pixel_values"].dtype)
    out["image_grid_thw"] = image_grid_thw.to(device)
    out[IMAGE_INDEX] = torch.as_tensor(image_index, dtype=torch.long).to(device)
    return out


@contextlib.contextmanager
def images_once(model: Any, inputs: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """The keyword arguments of one forward in which each distinct image is encoded once.

    With ``IMAGE_INDEX`` in ``inputs`` (``build_sequences``: the ``G`` sequences of a prompt
    share its image) the vision tower runs on the distinct images only, and each sequence
    receives its image's embeddings: the model's own ``get_image_features`` is wrapped for the
    block, inside the model's forward (so autocast, DDP and FSDP see the usual call), and the
    same embedding tensor feeds every sequence, so its gradient is the sum over them, as with
    per-sequence copies. The yielded arguments carry the per-sequence ``image_grid_thw`` (the
    3D rope positions need it). Without ``IMAGE_INDEX`` the inputs are yielded unchanged.
    """
    if IMAGE_INDEX not in inputs:
        yield inputs
        return
    index = inputs[IMAGE_INDEX]
    distinct_grid = inputs["image_grid_thw"]
    kwargs = {k: v for k, v in inputs.items() if k != IMAGE_INDEX}
    kwargs["image_grid_thw"] = sequence_grids(inputs)
    inner = attention.unwrap_model(model).model
    encode = inner.get_image_features
    order = index.tolist()

    def encode_distinct(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                        **kw: Any) -> Any:
        out = encode(pixel_values, distinct_grid.to(pixel_values.device), **kw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        expanded = tuple(feats[i] for i in order)
        if hasattr(out, "pooler_output"):
            out.pooler_output = expanded
            return out
        return expanded

    inner.get_image_features = encode_distinct
    try:
        yield kwargs
    finally:
        del inner.get_image_features


def completion_tokens(completion_ids: torch.Tensor, eos_id: int,
                      forbidden_ids: Sequence[int] = ()) -> tuple[list[list[int]], list[bool]]:
    """Cut sampled completions to their valid tokens.

    A completion keeps its tokens up to and including the first ``eos_id`` (all of them when it
    was truncated). A completion that sampled a forbidden (vision) token is cut before it and
    flagged: it gets reward 0, and re-processing it never sees a vision token.

    Args:
        completion_ids: ``[N, T]`` as returned by ``modeling.generate``.
        eos_id: id of ``<|im_end|>``.
        forbidden_ids: ids that must not appear (vision tokens).

    Returns:
        ``(tokens, ok)``: per completion its valid token ids, and False where a forbidden
        token was sampled.

    >>> completion_tokens(torch.tensor([[5, 6, 2, 0], [5, 9, 7, 7]]), eos_id=2, forbidden_ids=[9])
    ([[5, 6, 2], [5]], [True, False])
    """
    forbidden = set(int(i) for i in forbidden_ids)
    out, ok = [], []
    for row in completion_ids.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        bad = next((k for k, t in enumerate(row) if t in forbidden), None)
        ok.append(bad is None)
        out.append(row if bad is None else row[:bad])
    return out, ok


@dataclass
class SequenceBatch:
    """Prompt + completion sequences of some prompts, ready for a forward."""

    inputs: dict[str, torch.Tensor]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: int
    group_size: int
    image_sizes: list[tuple[int, int]]
    grid_thw: torch.Tensor
    focus_targets: list[torch.Tensor | None]

    @property
    def query_positions(self) -> torch.Tensor:
        """``[N, T]``: the position whose logits predict completion token ``t`` (``S - 1 + t``).

        Its attention row is the token's query row for the faithful reward.
        """
        n, t = self.completion_ids.shape
        return (self.prompt_len - 1 + torch.arange(t)).expand(n, t)

    def to(self, device: Any) -> SequenceBatch:
        """The batch on ``device``."""
        moved = {k: v.to(device) for k, v in self.inputs.items()}
        return SequenceBatch(moved, self.completion_ids.to(device),
                             self.completion_mask.to(device), self.prompt_len, self.group_size,
                             self.image_sizes, self.grid_thw, self.focus_targets)


def build_sequences(rows: Sequence[dict[str, Any]], completions: Sequence[Sequence[Sequence[int]]],
                    processor: Any, share_images: bool = True) -> SequenceBatch:
    """Left-padded prompts + right-padded completions: ``G`` completions per record.

    Args:
        rows: the records (image, question, evidence boxes).
        completions: per record, ``G`` completions as token-id lists (the same ``G`` for all).
        processor: the model's processor.
        share_images: store each prompt's image once, with ``IMAGE_INDEX`` naming the image of
            every sequence (``completion_logits`` then runs the vision tower once per prompt);
            False repeats the image inputs ``G`` times (every sequence encodes its own copy).

    Returns:
        A ``SequenceBatch`` of ``len(rows) * G`` sequences.
    """
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} records but {len(completions)} completion lists")
    g_size = len(completions[0])
    if any(len(c) != g_size for c in completions):
        raise ValueError("every record must have the same number of completions")
    batch = encode_batch(rows, processor, "plain", with_response=False)
    enc = batch.inputs
    pad_id = processor.tokenizer.pad_token_id
    flat = [list(c) for per_row in completions for c in per_row]
    n = len(flat)
    t = max(1, max(len(c) for c in flat))
    comp = torch.full((n, t), pad_id, dtype=torch.long)
    cmask = torch.zeros((n, t), dtype=torch.long)
    for i, toks in enumerate(flat):
        if toks:
            comp[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            cmask[i, : len(toks)] = 1
    inputs = {
        "input_ids": torch.cat([enc["input_ids"].repeat_interleave(g_size, dim=0), comp], dim=1),
        "attention_mask": torch.cat([enc["attention_mask"].repeat_interleave(g_size, dim=0),
                                     cmask], dim=1),
    }
    if share_images:
        inputs["pixel_values"], inputs["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
        inputs[IMAGE_INDEX] = torch.arange(len(rows)).repeat_interleave(g_size)
    else:
        inputs["pixel_values"], inputs["image_grid_thw"] = repeat_image_inputs(
            enc["pixel_values"], enc["image_grid_thw"], g_size)
    if "mm_token_type_ids" in enc:  # kept when the encoder provides it (3D rope positions)
        inputs["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"].repeat_interleave(g_size, dim=0),
             torch.zeros_like(comp, dtype=enc["mm_token_type_ids"].dtype)], dim=1)
    return SequenceBatch(inputs=inputs, completion_ids=comp, completion_mask=cmask,
                         prompt_len=enc["input_ids"].shape[1], group_size=g_size,
                         image_sizes=[r["image"].size for r in rows],
                         grid_thw=enc["image_grid_thw"], focus_targets=batch.targets)


def completion_logits(model: Any, inputs: dict[str, torch.Tensor], n_completion: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict the last ``n_completion`` tokens of each sequence, fp32.

    Only the needed positions go through the LM head (``logits_to_keep``); inputs whose images
    are stored once (``IMAGE_INDEX``) encode each image once (``images_once``).

    Returns:
        ``[N, n_completion, V]``; row ``t`` predicts token ``seq - n_completion + t``.
    """
    with images_once(model, inputs) as kwargs:
        out = model(**kwargs, logits_to_keep=n_completion + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each target token under ``logits`` (fp32), zero where masked.

    Args:
        logits: ``[N, T, V]``: row ``t`` is the distribution that predicts ``target_ids[:, t]``.
        target_ids: ``[N, T]``.
        mask: ``[N, T]`` valid tokens (default: all).

    Returns:
        ``[N, T]``.

    >>> token_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, 3]])).exp().tolist()
    [[0.25, 0.25]]
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target_ids[..., None])[..., 0]
    if mask is not None:
        logp = logp * mask.to(logp.dtype)
    return logp


def answer_span(tokens: Sequence[int], open_id: int, close_id: int) -> tuple[int, int] | None:
    """``(start, end)`` of the tokens strictly inside the first ``<answer>...</answer>``.

    Returns None when either tag is missing or the span is empty.

    >>> answer_span([7, 1, 5, 6, 2, 9], open_id=1, close_id=2)
    (2, 4)
    >>> answer_span([7, 1, 2], open_id=1, close_id=2) is None
    True
    """
    toks = list(tokens)
    if open_id not in toks:
        return None
    a = toks.index(open_id)
    if close_id not in toks[a + 1:]:
        return None
    b = a + 1 + toks[a + 1:].index(close_id)
    return (a + 1, b) if b > a + 1 else None


def answer_token_mask(labels: torch.Tensor, open_id: int, close_id: int) -> torch.Tensor:
    """Labelled tokens of each row inside its answer span (all labelled ones if it has none).

    Args:
        labels: ``[B, T]`` token ids, -100 outside the response.
        open_id: id of ``<answer>``.
        close_id: id of ``</answer>``.

    Returns:
        BoolTensor ``[B, T]``.

    >>> answer_token_mask(torch.tensor([[-100, 7, 1, 5, 6, 2, 9]]), 1, 2).tolist()
    [[False, False, False, True, True, False, False]]
    """
    out = torch.zeros_like(labels, dtype=torch.bool)
    for b, row in enumerate(labels.tolist()):
        idx = [k for k, v in enumerate(row) if v != -100]
        span = answer_span([row[k] for k in idx], open_id, close_id)
        if span is None:
            out[b, idx] = True
        else:
            out[b, idx[span[0]]:idx[span[1] - 1] + 1] = True
    return out


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """No-grad, eval-mode block (no dropout, no gradient checkpointing), restoring the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
