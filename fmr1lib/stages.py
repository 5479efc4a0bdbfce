"""The stage layer: where each stage's run lives, how its params chain, what a stage starts from.

The pipeline (docs/design.md §2):

    data (01) -> backbone (02, stage 0) -> anchor/<variant> (03, stage 1) -> rl/<variant> (04, stage 2)

Every run folder is ``runs/<profile>/<stage>[/<variant>[_seed<k>][_n<prompts>]]`` and holds the
``params.json`` it was made with, ``metrics.jsonl``, ``checkpoints/``, ``info.json`` and the
trained ``model/``. A stage's params name the params files of the stages before it
(``data_params_file``, ``backbone_params_file``, ``anchor_params_file``); ``upstream_params``
follows those pointers, so a stage-2 run of seed ``k`` starts from stage 1 of seed ``k``. Only
this module names run folders: the notebooks, the CLI and the ablation call it.

A stage never trains the run it starts from unasked: a missing start model stops it with
``MissingPrerequisiteError``, naming the commands that make it, unless the caller passes
``build=True`` (the CLI's ``--build-missing``, the notebooks' cells that say so, the ablation).
Then ``build_stage``, the one place that trains a run on the way to another, prints one line
saying what it builds and why, before the stage touches its own run folder.

A stage holds the folder's ``runlock.RunLock`` while it writes (one writer per folder), and
checks everything first: a resume's params and inputs, the dataset, the start model; a refusal
leaves the folder as it was. Then it removes the folder's completion marker ``complete.json``
and records its params and inputs (``inputs.json``: ``run_inputs``); the run writes the marker
again last, after ``model/`` and ``info.json``, only when it ran every step, with those inputs
and the hash of ``model/``. ``run_status`` is the one answer to "is this run finished": the
marker's inputs must equal the run's inputs now (its trajectory params, the content of every
upstream params file, the records files, the start model, itself finished now), so a run that
was killed, stopped early, or made from inputs that have changed since never counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from fmr1lib import (
    anchoring,
    checkpoints,
    config,
    data,
    grpo,
    modeling,
    owndata,
    repro,
    runlock,
    train,
)
from fmr1lib.choices import Stage, options

logger = logging.getLogger(__name__)

STAGES = options(Stage)  # the stages that train a model (the data stage builds the dataset)

ROWS: dict[str, tuple[str, str | None]] = {
    "backbone": ("backbone", None),
    "plain_sft": ("anchor", "plain"),
    "text_perception": ("anchor", "text_perception"),
    "anchoring": ("anchor", "focus_anchor"),
    "grpo_backbone": ("rl", "grpo_backbone"),
    "anchoring_grpo": ("rl", "grpo"),
    "faithful_mr1": ("rl", "faithful"),
    "faithful_mr1_occlusion": ("rl", "faithful_occlusion"),
    "plain_grpo": ("rl", "grpo_plain"),
    "plain_faithful": ("rl", "faithful_plain"),
}
"""Ablation row -> (stage, variant of that stage)."""

assert set(ROWS) == set(config.ABLATION_ROWS)

_POINTERS = {"data": ("data_params_file", config.DataParams),
             "backbone": ("backbone_params_file", config.BackboneParams),
             "anchor": ("anchor_params_file", config.AnchorParams)}


# --------------------------------------------------------------------------------------
# Params chaining and run folders
# --------------------------------------------------------------------------------------


def upstream_params(p: Any, stage: str) -> Any:
    """The params of an earlier ``stage`` (``data``, ``backbone``, ``anchor``) that ``p`` points at.

    The run root and profile are ``p``'s; the seed too for stage 1 (a seed's stage 2 starts from
    the same seed's stage 1; the backbone is one model for every seed). The pointers to data
    and backbone files travel with the chain, so every stage of a run reads the files ``p``
    names. RL params reach the backbone through their anchor params.
    """
    key, cls = _POINTERS[stage]
    if not hasattr(p, key):
        if stage == "backbone" and hasattr(p, "anchor_params_file"):
            return upstream_params(upstream_params(p, "anchor"), "backbone")
        raise ValueError(f"{type(p).__name__} has no {key!r}: it does not follow stage {stage!r}")
    overrides: dict[str, Any] = {"run_root": p.run_root, "profile": p.profile}
    if stage != "data" and hasattr(p, "data_params_file"):
        overrides["data_params_file"] = p.data_params_file
    if stage == "anchor":
        overrides["seed"] = getattr(p, "seed", 0)
        if hasattr(p, "backbone_params_file"):
            overrides["backbone_params_file"] = p.backbone_params_file
    return config.load_pointed(cls, repro.resolve_path(getattr(p, key)), key, **overrides)


def run_folder(p: Any, stage: str, variant: str | None = None, create: bool = True) -> Path:
    """``runs/<profile>/backbone`` or ``runs/<profile>/<stage>/<variant>[_seed<k>][_n<prompts>]``.

    Seed 0 and the full prompt set keep the plain name. ``p`` are the params of ``stage``.
    """
    if stage == "backbone":
        return repro.run_dir(p, "backbone", create=create)
    if stage not in STAGES or variant is None:
        raise ValueError(f"run folder of stage {stage!r}, variant {variant!r}: use one of "
                         f"{STAGES} with a variant (backbone: none)")
    name = variant if p.seed == 0 else f"{variant}_seed{p.seed}"
    if stage == "rl" and p.n_prompts:
        name += f"_n{p.n_prompts}"
    return repro.run_dir(p, stage, name, create=create)


def model_folder(p: Any, stage: str, variant: str | None = None) -> Path:
    """The trained model of a run (``run_folder(...) / "model"``); ``p`` may be any later
    stage's params (the chain is followed)."""
    if stage == "backbone" and not isinstance(p, config.BackboneParams):
        p = upstream_params(p, "backbone")
    elif stage == "anchor" and not isinstance(p, config.AnchorParams):
        p = upstream_params(p, "anchor")
    return run_folder(p, stage, variant, create=False) / "model"


def row_name(stage: str, variant: str | None) -> str:
    """The ablation row of a stage's variant (the variant itself if it is not a row, e.g. ``plain``)."""
    return next((r for r, sv in ROWS.items() if sv == (stage, variant)), variant or stage)


def eval_name(stage: str, variant: str | None, seed: int, n_prompts: int = 0) -> str:
    """File stem of a model's cached evaluation (``backbone``, ``anchoring_seed1``,
    ``faithful_mr1_seed0_n8``), shared by notebooks 03-05."""
    row = row_name(stage, variant)
    if row == "backbone":
        return "backbone"
    return f"{row}_seed{seed}" + (f"_n{n_prompts}" if n_prompts else "")


def eval_path(p: Any, name: str) -> Path:
    """``runs/<profile>/eval/<name>.json``."""
    return repro.run_dir(p, "eval") / f"{name}.json"


COMPLETE = "complete.json"
"""A run folder's completion marker, written last by the run that finished (``mark_complete``)."""

INPUTS = "inputs.json"
"""The fingerprint of a run's inputs when it started (``run_inputs``), written by ``start_run``."""

UNFINISHED = "<not finished>"
"""The fingerprint ``run_inputs`` gives a start model whose own run is not finished now."""


STAMP_OMITS_AT = config.ADDED_AT
"""Keys added after results were stamped, left out of ``params_hash`` at these values (what the
earlier results were made with), so a new key at its default keeps their stamps valid."""


def params_hash(params: Any) -> str:
    """SHA-256 of the resolved params (class and every field, canonical JSON, less
    ``STAMP_OMITS_AT``): the results files' stamp (``ablation.study_params_hash``)."""
    values = config.without_added_defaults(config.params_to_dict(params))
    blob = json.dumps({"class": type(params).__name__, "params": values},
                      sort_keys=True, default=str)
    return repro.sha256_text(blob)


def content_hash(params: Any) -> str:
    """SHA-256 of what of ``params`` decides a result: ``train.trajectory_params`` (every field
    but the keys that may change on resume: ``resume``, ``log_every``, ``eval_*``, ...)."""
    blob = json.dumps({"class": type(params).__name__, "params": train.trajectory_params(params)},
                      sort_keys=True, default=str)
    return repro.sha256_text(blob)


_STAGE_OF = {"BackboneParams": "backbone", "AnchorParams": "anchor", "RLParams": "rl"}


def _start_run_of(p: Any, stage: str, variant: str | None) -> tuple[Any, str, str | None] | None:
    """``(params, stage, variant)`` of the run whose model the ``stage`` run of ``p`` starts from."""
    if stage == "anchor":
        return upstream_params(p, "backbone"), "backbone", None
    if stage == "rl":
        ap = upstream_params(p, "anchor")
        start = start_variant(variant or "grpo")
        if start is None:
            return upstream_params(ap, "backbone"), "backbone", None
        return ap, "anchor", start
    return None


def run_inputs(p: Any, stage: str, variant: str | None = None) -> dict[str, str]:
    """The fingerprint of everything that decides the result of the ``stage`` run of ``p``:
    ``{input: sha256}`` over its own trajectory params, the resolved content of every upstream
    params file (data, backbone, stage 1), the records files of a JSONL dataset and the model
    it starts from (the start run's recorded model hash; ``UNFINISHED`` when that run is not
    finished now)."""
    dp = upstream_params(p, "data")
    out = {"params": content_hash(p), "data params": content_hash(dp)}
    if dp.source == "jsonl":
        out["records files"] = repro.sha256_text(json.dumps(data.source_files(dp), sort_keys=True))
    if stage == "rl":
        out["anchor params"] = content_hash(upstream_params(p, "anchor"))
    if stage in ("anchor", "rl"):
        out["backbone params"] = content_hash(upstream_params(p, "backbone"))
    start = _start_run_of(p, stage, variant)
    if start is not None:
        status = run_status(*start)
        out["start model"] = status.model_sha256 if status.finished else UNFINISHED
    return out


def _describe(p: Any, stage: str, variant: str | None, key: str) -> str:
    """An input of ``run_inputs`` as a message names it (with its file or run folder)."""
    files = {"data params": "data_params_file", "anchor params": "anchor_params_file",
             "backbone params": "backbone_params_file"}
    if key in files:
        holder = p if hasattr(p, files[key]) else upstream_params(p, "anchor")
        return f"{key} ({getattr(holder, files[key])})"
    if key == "records files":
        return f"records files ({', '.join(upstream_params(p, 'data').jsonl_files.values())})"
    if key == "start model":
        start = _start_run_of(p, stage, variant)
        return f"start model ({run_folder(start[0], start[1], start[2], create=False) / 'model'})"
    return f"its own params ({type(p).__name__})"


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """Whether a run folder holds a finished run of the inputs it would be made from now."""

    folder: Path
    finished: bool
    reason: str = ""
    """Empty when finished, else ``not finished: <what> ...``."""
    model_sha256: str = ""
    """The finished run's model hash (``repro.folder_sha256`` of ``model/``)."""

    def __bool__(self) -> bool:
        return self.finished


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_status(p: Any, stage: str, variant: str | None = None) -> RunStatus:
    """Whether the ``stage`` run of ``p`` (its ``variant``) is finished: the one answer every
    consumer asks (the CLI's prerequisite check, ``ensure_backbone``, ``start_model``, the
    notebooks, the ablation's reuse).

    Finished means: the folder's completion marker was written by a run that ran every step,
    the inputs it records equal ``run_inputs`` now (its own trajectory params, every upstream
    params file's content, the dataset's records files and its start model, itself finished
    now), and ``model/`` still holds the files the marker hashed. Otherwise ``reason`` says
    which input changed.
    """
    folder = run_folder(p, stage, variant, create=False)
    marker = _read_json(folder / COMPLETE)
    if marker is None:
        return RunStatus(folder, False, f"not finished: no finished run in {folder}")
    saved = marker.get("inputs")
    if not isinstance(saved, dict) or not (folder / "model" / "config.json").exists():
        return RunStatus(folder, False, f"not finished: {folder} records no finished model "
                                        f"with its inputs (made before inputs were recorded)")
    now = run_inputs(p, stage, variant)
    for key in [*now, *(k for k in saved if k not in now)]:
        if now.get(key) == UNFINISHED:
            return RunStatus(folder, False, f"not finished: {_describe(p, stage, variant, key)} "
                                            f"is not finished")
        if saved.get(key) != now.get(key):
            return RunStatus(folder, False, f"not finished: {_describe(p, stage, variant, key)} "
                                            f"changed since {folder} finished")
    model_sha = repro.folder_sha256(folder / "model")
    if model_sha != marker.get("model_sha256"):
        return RunStatus(folder, False, f"not finished: {folder / 'model'} changed since its "
                                        f"run finished")
    return RunStatus(folder, True, "", model_sha)


def mark_complete(folder: Path, params: Any, **info: Any) -> Path:
    """Write ``folder/complete.json`` (atomically): the run that made ``folder`` finished, with
    ``params`` and the inputs it started from (``INPUTS``), and the hash of ``model/``. Call it
    after everything else of the run is on disk."""
    folder = Path(folder)
    inputs = _read_json(folder / INPUTS)
    if inputs is None:
        stage = _STAGE_OF[type(params).__name__]
        inputs = run_inputs(params, stage, info.get("variant"))
    return repro.atomic_write_json(folder / COMPLETE, {
        "class": type(params).__name__, "params_sha256": params_hash(params), **info,
        "inputs": inputs, "model_sha256": repro.folder_sha256(folder / "model")})


def check_resume_inputs(p: Any, stage: str, variant: str | None, ckpt_dir: Path,
                        inputs: dict[str, str]) -> None:
    """Refuse, before the run folder is touched, a resume (``p.resume``) that would continue a
    checkpoint of ``ckpt_dir`` with other trajectory params (``train.check_resume``) or other
    inputs than the run started from (an upstream params file, the records files, the start
    model: ``INPUTS``).

    Raises:
        train.ResumeMismatchError: naming the changed key or input.
        checkpoints.CheckpointError: there are checkpoints but none is valid.
    """
    if not p.resume or not ckpt_dir.exists():
        return
    out = run_folder(p, stage, variant, create=False)
    ck = checkpoints.latest_checkpoint(ckpt_dir)
    if ck is None:
        return
    train.check_resume(ck, p)
    saved = _read_json(out / INPUTS)
    if saved is None:
        logger.warning("%s records no inputs (written before they were stored): resuming %s "
                       "without checking them", out, ck)
        return
    changed = [k for k in inputs if k != "params" and saved.get(k) != inputs[k]]
    if changed:
        what = ", ".join(_describe(p, stage, variant, k) for k in changed)
        raise train.ResumeMismatchError(
            f"cannot resume {ck}: {what} changed since the run started; a resumed run would be "
            f"trained on two versions of it. Restore it, or start anew with resume: false.")


def start_run(folder: Path, params: Any, acc: Any, inputs: dict[str, str] | None = None) -> None:
    """What a stage does to its run folder once every check passed: drop the completion
    marker of an earlier run (first, so a kill from here on leaves the folder incomplete),
    then record ``params`` (``params.json``) and ``inputs`` (``INPUTS``). The main process
    writes."""
    if acc.is_main_process:
        (Path(folder) / COMPLETE).unlink(missing_ok=True)
        repro.save_params(params, folder)
        if inputs is not None:
            repro.atomic_write_json(Path(folder) / INPUTS, inputs)


@contextlib.contextmanager
def _writing(folder: Path, acc: Any) -> Any:
    """Hold ``folder``'s run lock (main process only) while a stage writes it."""
    with runlock.RunLock(folder, enabled=acc.is_main_process):
        yield


# --------------------------------------------------------------------------------------
# Inputs of a stage: data (built if missing) and start models (built only when asked)
# --------------------------------------------------------------------------------------


def stage_data(p: Any, acc: Any = None, dsd: Any = None) -> Any:
    """``dsd``, or the ``DatasetDict`` named by ``p.data_params_file``: FocusShapes or, with
    ``source: jsonl``, the records files it names (``data.load_or_make``: built if missing,
    every JSONL record validated before any stage trains; under accelerate the main process
    builds it first)."""
    if dsd is not None:
        return dsd
    with acc.main_process_first() if acc is not None else contextlib.nullcontext():
        return data.load_or_make(upstream_params(p, "data"))


def load_model(folder: Path, p: Any, made_by: str) -> tuple[Any, Any]:
    """The model saved in ``folder`` (clear error naming the notebook ``made_by`` if missing)."""
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no model at {folder}: run notebooks/{made_by}.ipynb")
    return modeling.load_saved_backbone(folder, p)


class MissingPrerequisiteError(RuntimeError):
    """A stage's start model is missing and building it was not asked for (``build=False``,
    the default; ``--build-missing`` on the command line)."""


def _make_command(stage: str, p: Any, file: str | None, variant: str | None = None) -> str:
    """``python -m fmr1lib <stage> --params <file>`` that makes the run ``p`` describes: with
    ``--variants`` and a ``--set`` for every value the chain gave ``p`` that differs from the
    file's (e.g. the seed of a stage-2 run). ``file`` None: the file is not known here."""
    import shlex

    cmd = f"python -m fmr1lib {stage} --params {file or '...'}"
    if variant is not None:
        cmd += f" --variants {variant}"
    if file is None:
        return cmd
    plain = config.load_params(type(p), repro.resolve_path(file))
    for key, value in config.params_to_dict(p).items():
        if value != getattr(plain, key):
            text = value if isinstance(value, str) else json.dumps(value)
            cmd += f" --set {shlex.quote(f'{key}={text}')}"
    return cmd


_MADE_IN = {"backbone": "02_backbone", "anchor": "03_anchoring", "rl": "04_counterfactual_rl"}


def _run_name(stage: str, variant: str | None) -> str:
    """``the stage-0 backbone``, ``the stage-1 plain model``, ``the stage-2 faithful run``."""
    if stage == "backbone":
        return "the stage-0 backbone"
    return f"the stage-1 {variant} model" if stage == "anchor" else f"the stage-2 {variant} run"


@dataclasses.dataclass(frozen=True)
class Prerequisite:
    """A run that no finished run folder holds for the inputs it would be made from now: what
    ``build_stage`` trains, or what ``MissingPrerequisiteError`` names."""

    params: Any
    stage: str
    variant: str | None
    status: RunStatus
    """Its ``run_status`` (``reason`` says why it is not finished)."""
    command: str = ""
    """The command that makes it (``python -m fmr1lib ...``)."""

    def describe(self) -> str:
        """What it is, where, why it is not finished and which notebook makes it."""
        return (f"{_run_name(self.stage, self.variant)} ({self.status.folder}, "
                f"{self.status.reason}; notebooks/{_MADE_IN[self.stage]}.ipynb)")


def _missing_backbone(p: Any) -> list[Prerequisite]:
    """The stage-0 backbone of ``p``'s chain (``p`` itself for ``BackboneParams``), if no run
    holds it finished."""
    bp = p if isinstance(p, config.BackboneParams) else upstream_params(p, "backbone")
    status = run_status(bp, "backbone")
    if status:
        return []
    if isinstance(p, config.BackboneParams):
        file = None
    else:
        file = getattr(p, "backbone_params_file", None) or upstream_params(
            p, "anchor").backbone_params_file
    return [Prerequisite(bp, "backbone", None, status, _make_command("backbone", bp, file))]


def _missing_runs(p: Any, stage: str, variant: str | None = None) -> list[Prerequisite]:
    """The start models the ``stage`` run of ``p`` (``anchor``, ``rl``; its ``variant``) needs
    and that no run holds finished (``run_status``), in the order to make them."""
    if stage == "rl":
        ap = upstream_params(p, "anchor")
        start = start_variant(variant or "grpo")
        if start is None:
            return _missing_backbone(ap)
        status = run_status(ap, "anchor", start)
        if status:
            return []
        return [*_missing_backbone(ap), Prerequisite(
            ap, "anchor", start, status, _make_command("anchor", ap, p.anchor_params_file, start))]
    if stage == "anchor":
        return _missing_backbone(p)
    return []


def missing_prerequisites(p: Any, stage: str, variant: str | None = None) -> list[tuple[str, str]]:
    """The start models the ``stage`` run of ``p`` (``anchor``, ``rl``; its ``variant``) needs
    and that no run holds finished (``run_status``), in the order to make them: ``(what,
    command)`` pairs; ``what`` says why (``not finished: <input> changed``)."""
    return [(m.describe(), m.command) for m in _missing_runs(p, stage, variant)]


def build_stage(run: Prerequisite, needed_for: str, dsd: Any = None, announce: bool = True) -> None:
    """Train ``run`` (a missing backbone, stage-1 model or stage-2 run) for ``needed_for``: the
    one place a run is trained on the way to another, what it starts from first. One line first
    says what it builds and why (``building the stage-0 backbone, needed for the stage-1 plain
    model (not finished: ...)``), unless the caller reports its runs (the ablation's rows)."""
    if announce:
        print(f"building {_run_name(run.stage, run.variant)}, needed for {needed_for} "
              f"({run.status.reason})", flush=True)
    if run.stage == "backbone":
        backbone_stage(run.params, dsd)
    elif run.stage == "anchor":
        anchor_stage(run.params, run.variant, dsd, build=True)
    else:
        rl_stage(run.params, run.variant, dsd, build=True)


def _build_or_stop(missing: list[Prerequisite], needed_for: str, build: bool, dsd: Any) -> None:
    """Build every run of ``missing`` in order (``build_stage``) when ``build``, else raise
    ``MissingPrerequisiteError`` naming each and the commands that make them."""
    if not missing:
        return
    if build:
        for run in missing:
            build_stage(run, needed_for, dsd)
        return
    names = " and ".join(m.describe() for m in missing)
    cmds = "\n".join(f"  {m.command}" for m in missing)
    it = "them, in this order" if len(missing) > 1 else "it"
    raise MissingPrerequisiteError(
        f"{needed_for} needs {names}; no finished run holds {it.split(',')[0]}. Make {it}:\n"
        f"{cmds}\nor rerun with --build-missing to build {it.split(',')[0]} first "
        f"(build=True from Python).")


def ensure_prerequisites(p: Any, stage: str, variants: list[str] | None = None,
                         build: bool = False, dsd: Any = None) -> None:
    """Before any work: every start model of the ``stage`` run(s) of ``p`` (``anchor``, ``rl``;
    its ``variants``) is finished, or is built now, in order, by ``build_stage`` when ``build``
    is True (one printed line each). The default stops instead: nothing trains unasked.

    Raises:
        MissingPrerequisiteError: ``build`` is False and a start model is missing; the message
            names each one and the commands that make them.
    """
    missing: dict[Path, Prerequisite] = {}
    for variant in variants or [None]:
        for run in _missing_runs(p, stage, variant):
            missing.setdefault(run.status.folder, run)
    needed_for = (f"stage {STAGES.index(stage)}" if not variants else
                  " and ".join(_run_name(stage, v) for v in variants))
    _build_or_stop(list(missing.values()), needed_for, build, dsd)


def ensure_backbone(p: Any, build: bool = False) -> tuple[Any, Any]:
    """The profile's saved stage-0 backbone (of ``p``'s chain), loaded. A missing one is built
    first (notebook 02's step, ``build_stage``) when ``build``, else ``MissingPrerequisiteError``
    names the command that makes it."""
    needed_for = "loading it" if isinstance(p, config.BackboneParams) else "stage 1"
    _build_or_stop(_missing_backbone(p), needed_for, build, None)
    return _load_start(p, "anchor")


def start_model(p: Any, variant: str, build: bool = False) -> tuple[Any, Any]:
    """The start policy of a stage-2 variant (``config.RLParams.START_VARIANTS``), loaded: the
    stage-0 backbone for ``grpo_backbone``, the same seed's stage-1 ``plain`` model for
    ``*_plain``, else its ``focus_anchor`` model. A missing one (and the backbone it starts
    from) is built first by ``build_stage`` when ``build``, else ``MissingPrerequisiteError``
    names the commands that make it."""
    ensure_prerequisites(p, "rl", [variant], build=build)
    return _load_start(p, "rl", variant)


def _load_start(p: Any, stage: str, variant: str | None = None) -> tuple[Any, Any]:
    """The start model of the ``stage`` run of ``p`` (``anchor``: the backbone; ``rl``: that of
    ``variant``), loaded from its run folder as it is: the caller made sure it is finished
    (``ensure_prerequisites``), so it is checked (hashed) once."""
    start = start_variant(variant) if stage == "rl" else None
    if start is not None:
        return modeling.load_saved_backbone(model_folder(p, "anchor", start), p)
    if stage == "rl":  # grpo_backbone: the backbone, loaded with the stage-1 params (dtype, kernel)
        p = upstream_params(p, "anchor")
    return modeling.load_saved_backbone(model_folder(p, "backbone"), p)


def start_variant(variant: str) -> str | None:
    """The stage-1 variant a stage-2 variant starts from (None: the backbone).

    >>> start_variant("grpo"), start_variant("faithful_plain"), start_variant("grpo_backbone")
    ('focus_anchor', 'plain', None)
    """
    return config.RLParams.START_VARIANTS.get(variant, "focus_anchor")


def prepare_trainable(model: Any, processor: Any, p: Any) -> Any:
    """LoRA-wrap the model (``p.lora``; the new tokens' rows train too) or freeze its vision
    tower (``p.freeze_vision``)."""
    if p.lora:
        return modeling.wrap_lora(model, p, processor)
    if p.freeze_vision:
        modeling.freeze_vision(model)
    return model


def save_stage(model: Any, processor: Any, p: Any, acc: Any, out: Path, variant: str,
               result: train.TrainResult) -> Any:
    """Save a trained stage under ``out``: the adapter (LoRA), the merged model in ``model/``,
    ``info.json`` and, last, the completion marker (only when ``result`` ran all ``p.steps``);
    the main process writes, every process waits for it. ``info.json``'s ``wall_time_s`` is the
    training time of every segment of a resumed run.

    Under FSDP / ZeRO-3 every process first takes part in gathering the full weights
    (``train.full_state_dict``), which the main process saves (LoRA is refused there by
    ``train.setup_training``).

    Returns:
        The model in eval mode (merged when LoRA was used).
    """
    if p.lora:
        if acc.is_main_process:
            model.save_pretrained(out / "adapter")  # the adapter alone, safetensors
        model = model.merge_and_unload()
    model.eval()
    prepared = result.prepared if result.prepared is not None else model
    gathered = train.full_state_dict(acc, prepared) if train.shards_parameters(acc) else None
    if acc.is_main_process:
        modeling.save_backbone(model, processor, out / "model", state_dict=gathered)
        repro.atomic_write_json(out / "info.json", {"variant": variant,
                                                    "wall_time_s": result.wall_time_s,
                                                    "steps": result.steps})
        if result.steps >= p.steps:
            mark_complete(out, p, variant=variant, steps=result.steps)
        else:
            logger.warning("%s: stopped after %d of %d steps; not marked complete", out,
                           result.steps, p.steps)
    acc.wait_for_everyone()  # the next stage loads this folder on every process
    return model


# --------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------


def backbone_stage(p: Any, dsd: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """Stage 0: build (tiny) or load (real) the backbone, warm it up (tiny), and save it.

    The tiny backbone stands in for an Instruct checkpoint: plain SFT on the ``warmup``
    split, which teaches the format and vocabulary without the shortcut cue.

    Args:
        p: ``BackboneParams``.
        dsd: the FocusShapes ``DatasetDict`` (loaded or built from ``p.data_params_file``
            when None).

    Returns:
        ``(model, processor, info)``; the backbone is saved under ``runs/<profile>/backbone/``.
    """
    owndata.check_warmup_source(p, f"BackboneParams (profile {p.profile!r})")  # before any work
    # Under ``accelerate launch`` every process runs this; only the main one writes.
    acc = train.make_accelerator(p, gradient_accumulation_steps=p.grad_accum)
    out = run_folder(p, "backbone")
    with _writing(out, acc):
        inputs = run_inputs(p, "backbone")
        check_resume_inputs(p, "backbone", None, out / "warmup" / "checkpoints", inputs)
        repro.seed_everything(p.seed)  # before the data, as the model is built after it
        if p.model_name == "tiny":
            dsd = stage_data(p, acc, dsd)
            if upstream_params(p, "data").source == "jsonl":
                owndata.warn_small_grids(dsd, p, f"{p.data_params_file} with the backbone's "
                                                 f"image_min_pixels/image_max_pixels")
        start_run(out, p, acc, inputs)  # every check passed: the folder is written from here
        return _backbone_stage(p, dsd, acc, out)


def _backbone_stage(p: Any, dsd: Any, acc: Any, out: Path) -> tuple[Any, Any, dict[str, Any]]:
    """``backbone_stage``'s work, under the run lock of ``out``, once its checks passed (and
    the seed set)."""
    info: dict[str, Any] = {"model_name": p.model_name}
    finished = True
    t0 = time.perf_counter()
    if p.model_name == "tiny":
        data_p = upstream_params(p, "data")
        model, processor = modeling.build_tiny_backbone(p, data_p.colors, data_p.shapes, p.seed)
        if p.warmup:
            res = anchoring.train_supervised(model, processor, dsd["warmup"], p, out / "warmup",
                                             variant=p.warmup_variant, accelerator=acc)
            info["warmup_wall_time_s"] = res.wall_time_s
            info["warmup_final_ce"] = res.metrics[-1]["ce"] if res.metrics else None
            finished = res.steps >= p.steps
    else:
        model, processor = modeling.load_backbone(p.model_name, p)
    model.eval()
    info["parameters"] = modeling.count_parameters(model)
    info["vocab_size"] = len(processor.tokenizer)
    if acc.is_main_process:
        modeling.save_backbone(model, processor, out / "model")
        info["total_time_s"] = time.perf_counter() - t0
        repro.atomic_write_json(out / "info.json", info)
        if finished:
            mark_complete(out, p)
    acc.wait_for_everyone()  # no process reads the folder before it is complete
    return model, processor, info


def _check_inputs(p: Any, stage: str, variant: str, out: Path, acc: Any,
                  dsd: Any) -> tuple[Any, Any, Any, dict[str, str]]:
    """Every check of a stage-1/2 run before its folder is touched (under its lock): a resume's
    params and inputs (``check_resume_inputs``), the dataset (built if missing) and its
    ``train_split``, the start model (loaded: the stage checked it, and built it if it was
    missing and ``build`` was given, before taking the lock). The seed is set right before the
    start model loads, where the run's random numbers begin.

    Returns:
        ``(dsd, model, processor, inputs)``: the start model as loaded, the run's inputs.
    """
    inputs = run_inputs(p, stage, variant)
    check_resume_inputs(p, stage, variant, out / "checkpoints", inputs)
    dsd = stage_data(p, acc, dsd)
    if p.train_split not in dsd:
        raise config.ParamsError(f"key 'train_split': the dataset has no split "
                                 f"{p.train_split!r} (it has {sorted(dsd)})")
    repro.seed_everything(p.seed)
    model, processor = _load_start(p, stage, variant)
    return dsd, model, processor, inputs


def anchor_stage(p: Any, variant: str, dsd: Any = None,
                 build: bool = False) -> tuple[Any, Any, train.TrainResult]:
    """Stage 1: train one variant from the saved backbone and save it under ``run_folder``.

    Args:
        p: ``AnchorParams``.
        variant: ``plain``, ``text_perception`` or ``focus_anchor``.
        dsd: the FocusShapes ``DatasetDict`` (loaded from the profile when None).
        build: build the backbone first if no finished run holds it (``build_stage``, one
            printed line); False (the default) raises ``MissingPrerequisiteError`` instead.

    Returns:
        ``(model, processor, result)``; the model is saved under ``run_folder(p, "anchor",
        variant)/model`` (merged weights when LoRA was used, so later stages load one folder).
    """
    ensure_prerequisites(p, "anchor", [variant], build, dsd)  # before the run folder is touched
    acc = train.make_accelerator(p, gradient_accumulation_steps=p.grad_accum)
    out = run_folder(p, "anchor", variant)
    with _writing(out, acc):
        dsd, model, processor, inputs = _check_inputs(p, "anchor", variant, out, acc, dsd)
        start_run(out, p, acc, inputs)  # every check passed: the folder is written from here
        model = prepare_trainable(model, processor, p)
        result = anchoring.train_supervised(model, processor, dsd[p.train_split], p, out,
                                            variant=variant, accelerator=acc)
        model = save_stage(model, processor, p, acc, out, variant, result)
    return model, processor, result


def rl_stage(p: Any, variant: str, dsd: Any = None,
             build: bool = False) -> tuple[Any, Any, train.TrainResult]:
    """Stage 2: train one variant from its start point (``start_model``) and save it under
    ``run_folder``; ``build`` as in ``anchor_stage`` (the start model and the backbone)."""
    ensure_prerequisites(p, "rl", [variant], build, dsd)  # before the run folder is touched
    acc = train.make_accelerator(p)
    out = run_folder(p, "rl", variant)
    with _writing(out, acc):
        dsd, model, processor, inputs = _check_inputs(p, "rl", variant, out, acc, dsd)
        start_run(out, p, acc, inputs)  # every check passed: the folder is written from here
        model = prepare_trainable(model, processor, p)
        result = grpo.train_grpo(model, processor, dsd[p.train_split], p, out, variant,
                                 accelerator=acc)
        model = save_stage(model, processor, p, acc, out, variant, result)
    return model, processor, result


# --------------------------------------------------------------------------------------
# Runs of the ablation: one seed's params, trained if missing
# --------------------------------------------------------------------------------------


def seed_params(ep: config.EvalParams, seed: int, n_prompts: int = 0) -> tuple[Any, Any, Any]:
    """``(BackboneParams, AnchorParams, RLParams)`` of one seed, from the evaluation's params files:
    the anchor and RL params get the seed and point at ``ep``'s data, backbone and anchor files,
    so a seed's stages read the files this evaluation names, its stage 2 starting from its stage 1.
    """
    common = {"run_root": ep.run_root, "profile": ep.profile, "data_params_file": ep.data_params_file}
    bp = config.load_params(config.BackboneParams, repro.resolve_path(ep.backbone_params_file),
                            **common)
    ap = config.load_params(config.AnchorParams, repro.resolve_path(ep.anchor_params_file),
                            seed=seed, backbone_params_file=ep.backbone_params_file, **common)
    rp = config.load_params(config.RLParams, repro.resolve_path(ep.rl_params_file), seed=seed,
                            n_prompts=n_prompts, anchor_params_file=ep.anchor_params_file, **common)
    return bp, ap, rp


def row_params(ep: config.EvalParams, row: str, seed: int, n_prompts: int = 0) -> Any:
    """The params of the stage that trains ablation ``row`` for ``seed``."""
    bp, ap, rp = seed_params(ep, seed, n_prompts)
    return {"backbone": bp, "anchor": ap, "rl": rp}[ROWS[row][0]]


def row_folder(ep: config.EvalParams, row: str, seed: int, n_prompts: int = 0) -> Path:
    """Run folder of ablation ``row`` for ``seed`` (its trained model is in ``<folder>/model``)."""
    return run_folder(row_params(ep, row, seed, n_prompts), *ROWS[row], create=False)


def ensure_trained(ep: config.EvalParams, row: str, seed: int, dsd: Any,
                   n_prompts: int = 0) -> Path:
    """Train ``row`` for ``seed`` unless its run is finished for the inputs it would be made
    from now (``run_status``): a changed upstream params file, dataset or start model retrains it.
    The ablation asks for what it needs, so it builds: its start model first (the same seed's
    stage-1 model; a missing backbone is announced by ``build_stage``'s line), then the row's
    run, which the ablation's own report line names.

    Returns:
        The folder of the trained model.
    """
    stage, variant = ROWS[row]
    params = row_params(ep, row, seed, n_prompts)
    folder = run_folder(params, stage, variant, create=False)
    needed_for = f"the ablation row {row}, seed {seed}" + (f", {n_prompts} prompts" if n_prompts else "")
    if stage == "backbone":
        _build_or_stop(_missing_backbone(seed_params(ep, seed)[1]), needed_for, True, None)
        return folder / "model"
    start = start_variant(variant) if stage == "rl" else None
    if start is not None:  # the start point, same seed
        ensure_trained(ep, next(r for r, sv in ROWS.items() if sv == ("anchor", start)), seed, dsd)
    if not (status := run_status(params, stage, variant)):
        build_stage(Prerequisite(params, stage, variant, status), needed_for, dsd, announce=False)
    return folder / "model"
