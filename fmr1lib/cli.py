"""Command line: run any stage or notebook headless.

    python -m fmr1lib data --params params/tiny/01_data_construction.yaml
    python -m fmr1lib backbone --params params/tiny/02_backbone.yaml
    python -m fmr1lib anchor --params params/tiny/03_anchoring.yaml
    python -m fmr1lib rl --params params/tiny/04_counterfactual_rl.yaml
    python -m fmr1lib ablation --params params/tiny/05_evaluation.yaml
    python -m fmr1lib notebook 01_data_construction --profile tiny
    python -m fmr1lib reproduce --profile tiny
    python -m fmr1lib check-params
    python -m fmr1lib profile new mine --from tiny --jsonl train=a.jsonl test_id=b.jsonl test_ood=c.jsonl

Stages run the same library calls as their notebooks, so ``accelerate launch -m fmr1lib
<stage> --params FILE`` runs them on GPUs. Every command validates its parameter files (unknown
keys, wrong types, values out of range), ``--set KEY=VALUE`` overrides (YAML values, checked
like the file), ``--variants`` (known variants, each once) and ``--profile`` (a folder under
``params/``; an unknown one lists those that exist) *before* any work: an error exits with
status 2 and a ``ParamsError`` line naming the file or flag and the key. ``--dry-run`` prints
the resolved parameters and what would run, and stops there.

``anchor`` and ``rl`` start from the model of the stage before; when no run holds it finished
for the inputs it would be made from now (``stages.run_status``: missing, or an upstream params
file, the records files or its own start model changed) they stop (status 3) with the reason
and the command that makes it, unless ``--build-missing`` asks to build it first. The notebooks,
``reproduce`` and ``ablation`` build what is missing, in order.

Every known failure (``ERRORS``: a refused resume, a locked run folder, no valid checkpoint, a
non-finite loss, bad data records, ...) exits with its own status and one line naming the file,
key or step; ``--debug`` shows its traceback instead.

``notebook`` and ``reproduce`` print a line as each code cell starts and estimate what is left
from the times of the last finished run (``runs/<profile>/reproduce_times.json``); the kernel
writes its progress (a ``[train]`` line per training run every ``KERNEL_TQDM_MININTERVAL``
seconds, text progress bars refreshed as rarely) to the terminal, not into the notebook
(``progress``). Each executed notebook is also written as HTML beside it (``write_html``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from fmr1lib import config, owndata, progress, repro
from fmr1lib.repro import project_root, run_dir

logger = logging.getLogger("fmr1lib")

NOTEBOOK_ORDER = list(config.PARAMS_BY_NOTEBOOK)

TIMES_FILE = "reproduce_times.json"
"""Per-notebook and per-cell seconds of the last finished run of each notebook (no overrides),
next to the executed notebooks' folder: ``runs/<profile>/reproduce_times.json``."""

KERNEL_TQDM_MININTERVAL = 30
"""Seconds between two refreshes of a progress bar inside a notebook kernel (tqdm's
``TQDM_MININTERVAL``): a bar then writes a few lines, not one per refresh."""

PROGRESS_LINES_ENV = progress.HEADLESS_ENV
"""``train.PROGRESS_LINES_ENV``: set in the kernels' environment, every training run there writes
a progress line every ``KERNEL_TQDM_MININTERVAL`` seconds to the terminal, and every progress
bar is a text bar on the terminal (``progress.bar``), so the executed notebook holds neither."""

_ENGINE = "fmr1-progress"


def params_file(profile: str, notebook: str) -> Path:
    """``params/<profile>/<notebook>.yaml`` under the project root."""
    return config.notebook_params_file(profile, notebook, project_root())


# --------------------------------------------------------------------------------------
# Progress of a notebook run
# --------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def times_path(profile: str, out_dir: Path | None = None) -> Path:
    """Where the notebook times of ``profile`` are kept (``TIMES_FILE``): next to the default
    output folder ``runs/<profile>/notebooks``, or inside an explicit ``out_dir``."""
    if out_dir is not None:
        return Path(out_dir) / TIMES_FILE
    return project_root() / "runs" / profile / TIMES_FILE


def read_times(path: Path) -> dict[str, Any]:
    """``{notebook: {"total_s", "cells_s", "finished"}}`` of ``path`` ({} if missing or unreadable)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    notebooks = data.get("notebooks") if isinstance(data, dict) else None
    return notebooks if isinstance(notebooks, dict) else {}


def _record_times(path: Path, notebook: str, total_s: float, cells_s: list[float]) -> None:
    times = read_times(path)
    times[notebook] = {"total_s": round(total_s, 2), "cells_s": [round(c, 2) for c in cells_s],
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    repro.atomic_write_json(path, {"notebooks": times})


class NotebookProgress:
    """The terminal's view of one notebook run: a line as each code cell starts (with an
    estimate of what is left, from the last run's times), a line when a long cell ends, and the
    kernel's stderr forwarded (papermill's ``stderr_file``)."""

    LONG_CELL_S = 2.0
    """A cell that took at least this long gets a ``done`` line."""

    def __init__(self, notebook: str, last: dict[str, Any] | None = None,
                 stream: TextIO | None = None) -> None:
        self.notebook = notebook
        self.last = last or {}
        self.stream = stream if stream is not None else sys.stderr
        self.cells_s: list[float] = []
        self.n_code = 0
        self.t0 = time.perf_counter()
        self._cell_t0 = self.t0
        self._line_open = False

    # papermill's stderr_file: the kernel's stderr, as it comes
    def write(self, text: str) -> int:
        if text:
            self.stream.write(text)
            self.stream.flush()
            self._line_open = not text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def line(self, text: str) -> None:
        """One whole line, after whatever partial line the kernel left."""
        self.stream.write(("\n" if self._line_open else "") + text + "\n")
        self.stream.flush()
        self._line_open = False

    def begin(self, n_code: int) -> None:
        self.n_code = n_code
        self.t0 = time.perf_counter()

    def estimate_left(self, index: int) -> str:
        """What is left of the notebook before code cell ``index`` starts, labelled as an
        estimate from the last run ('' when nothing was recorded)."""
        cells = self.last.get("cells_s")
        if isinstance(cells, list) and len(cells) == self.n_code:
            return f"~{_duration(sum(cells[index:]))} left (estimate: last run's cell times)"
        total = self.last.get("total_s")
        if isinstance(total, (int, float)):
            left = max(0.0, total - (time.perf_counter() - self.t0))
            return f"~{_duration(left)} left (estimate: last run took {_duration(total)})"
        return ""

    def cell_started(self, index: int, source: str) -> None:
        self._cell_t0 = time.perf_counter()
        first = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
        first = first if len(first) <= 60 else first[:57] + "..."
        est = self.estimate_left(index)
        self.line(f"[{self.notebook}] cell {index + 1}/{self.n_code}: {first}  "
                  f"({_duration(self._cell_t0 - self.t0)} in{'; ' + est if est else ''})")

    def cell_done(self, index: int) -> None:
        dt = time.perf_counter() - self._cell_t0
        self.cells_s.append(dt)
        if dt >= self.LONG_CELL_S:
            self.line(f"[{self.notebook}] cell {index + 1}/{self.n_code} done in {dt:.1f} s")


def _watch_cells(nb_man: Any, progress: NotebookProgress) -> None:
    """Report the code cells papermill's execution manager starts and completes."""
    code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
    rank = {i: k for k, i in enumerate(code)}
    progress.begin(len(code))
    start, complete = nb_man.cell_start, nb_man.cell_complete

    def cell_start(cell: Any, cell_index: int | None = None, **kwargs: Any) -> Any:
        out = start(cell, cell_index, **kwargs)
        if cell_index in rank:
            progress.cell_started(rank[cell_index], cell.source)
        return out

    def cell_complete(cell: Any, cell_index: int | None = None, **kwargs: Any) -> Any:
        out = complete(cell, cell_index, **kwargs)
        if cell_index in rank:
            progress.cell_done(rank[cell_index])
        return out

    nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete


def _register_engine() -> str:
    """papermill's nbclient engine, reporting cells to a ``progress`` keyword argument."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str,
                                     progress: NotebookProgress | None = None,
                                     **kwargs: Any) -> Any:
            if progress is not None:
                _watch_cells(nb_man, progress)
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(_ENGINE, ProgressEngine)
    return _ENGINE


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables (for the kernel papermill starts) for a block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_notebook(notebook: str, profile: str, out_dir: Path | None = None,
                 kernel: str | None = None, overrides: dict[str, Any] | None = None,
                 progress: bool = True) -> Path:
    """Validate the profile's parameter file and ``overrides``, then execute the notebook.

    Papermill injects only ``profile`` and ``overrides``: the notebook reads every other value
    from ``params/<profile>/<notebook>.yaml`` itself (``config.notebook_params``), so the
    executed notebook does not repeat the file.

    Papermill writes the executed notebook as it goes and marks it finished even when a cell
    fails, so it writes to ``<notebook>.partial.ipynb`` next to the output, which is renamed to
    ``<notebook>.ipynb`` only when every cell ran. An earlier output is removed first: the
    notebook resets its results file when it starts, so ``<notebook>.ipynb`` exists only for
    a run that finished, and an interrupted run leaves only the ``.partial`` one.

    With ``progress`` (``NotebookProgress``, on stderr): a line per code cell with an estimate
    of what is left from the last finished run's times (``times_path``; a run without
    overrides records its own there), and the kernel's stderr, whose progress bars refresh
    at most every ``KERNEL_TQDM_MININTERVAL`` seconds.

    Returns the path of the executed notebook (``runs/<profile>/notebooks/`` by default).
    """
    import papermill

    if notebook not in config.PARAMS_BY_NOTEBOOK:
        raise SystemExit(f"unknown notebook {notebook!r}; known: {NOTEBOOK_ORDER}")
    root = project_root()
    pfile = params_file(profile, notebook)
    if not pfile.exists():
        raise SystemExit(f"no parameter file {pfile} for profile {profile!r}")
    overrides = dict(overrides or {})
    if "profile" in overrides:
        raise config.ParamsError("override 'profile': give the profile as run_notebook's profile argument")
    # Fails here, before any work: the same checks the notebook's config cell runs.
    config.notebook_params(notebook, {"profile": profile}, root=root, **overrides)
    times_file = times_path(profile, out_dir)
    out_dir = out_dir or (root / "runs" / profile / "notebooks")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{notebook}.ipynb"
    partial = out_dir / f"{notebook}.partial.ipynb"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    reporter = NotebookProgress(notebook, read_times(times_file).get(notebook)) if progress else None
    engine = {"engine_name": _register_engine(), "progress": reporter,
              "stderr_file": reporter} if reporter is not None else {}
    # The kernel's progress goes to the terminal (progress.HEADLESS_ENV); the bars of the
    # Hugging Face libraries (saving a dataset, downloading a checkpoint) would land in the
    # notebook as widgets frozen at their first frame, so they are off.
    with _environ(TQDM_MININTERVAL=str(KERNEL_TQDM_MININTERVAL),
                  TQDM_MAXINTERVAL=str(4 * KERNEL_TQDM_MININTERVAL),
                  HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                  **{PROGRESS_LINES_ENV: str(KERNEL_TQDM_MININTERVAL)}):
        papermill.execute_notebook(
            str(root / "notebooks" / f"{notebook}.ipynb"), str(partial),
            parameters={"profile": profile, **overrides}, cwd=str(root / "notebooks"),
            kernel_name=kernel, progress_bar=False, log_output=False, **engine)
    if partial.exists():  # papermill wrote it (always, unless replaced by a stand-in)
        os.replace(partial, out)
        try:
            write_html(out)
        except Exception as exc:  # noqa: BLE001 (the page is a convenience; the run stands)
            logger.warning("%s: no HTML page written (%s: %s)", out, type(exc).__name__, exc)
    total = time.perf_counter() - start
    if reporter is not None and reporter.cells_s and not overrides:
        _record_times(times_file, notebook, total, reporter.cells_s)
    logger.info("%s done in %.1f s -> %s", notebook, total, out)
    return out


def write_html(notebook: Path) -> Path:
    """The executed ``notebook`` as a standalone HTML page beside it (same name, ``.html``;
    figures embedded), so a headless run leaves a report any browser opens."""
    import nbconvert
    import nbformat

    body, _ = nbconvert.HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    html = Path(notebook).with_suffix(".html")
    repro.atomic_write_bytes(html, body.encode("utf-8"))
    return html


def reproduce_notes(profile: str) -> list[str]:
    """What ``reproduce`` does on a profile that loads a real checkpoint (``model_name`` not
    ``tiny``), for ``--dry-run``: where it runs, what it downloads, how long it takes."""
    bp = config.load_params(config.BackboneParams, params_file(profile, "02_backbone"))
    if bp.model_name == "tiny":
        return []
    return [f"load {bp.model_name} (downloaded from the Hugging Face hub on first use unless it "
            "is a local folder)",
            "run every notebook in one kernel process each: one device, no accelerate launch, "
            "the whole ablation of notebook 05 (every row and seed) in a single process; for "
            "several GPUs run the stages instead: accelerate launch --config_file "
            "params/accelerate/<config>.yaml -m fmr1lib <stage> --params "
            f"params/{profile}/<stage file>.yaml (README: Running on GPUs)",
            "take many GPU hours: nothing has been run on a GPU yet; the README's per-stage "
            "estimate is derived from CPU measurements at the real widths (bench/README.md)"]


def reproduce_estimate(names: list[str], times: dict[str, Any], where: Path) -> str:
    """What is left of a ``reproduce`` run before ``names`` run, from the last run's times,
    labelled as an estimate."""
    known = {n: times[n]["total_s"] for n in names
             if isinstance(times.get(n), dict) and isinstance(times[n].get("total_s"), (int, float))}
    if not known:
        return f"no estimate of what is left (no finished run recorded in {where})"
    text = f"~{_duration(sum(known.values()))} left (estimate from the last run's times in {where}"
    unknown = [n for n in names if n not in known]
    return text + (f"; none recorded for {', '.join(unknown)})" if unknown else ")")


# --------------------------------------------------------------------------------------
# Parameters from the command line
# --------------------------------------------------------------------------------------


def parse_sets(items: list[str] | None, cls: type, where: str = "--set") -> dict[str, Any]:
    """``--set KEY=VALUE`` items as overrides of ``cls``: each KEY a field, given once, each
    VALUE parsed as YAML (``steps=50`` an int, ``variants=[plain]`` a list); ParamsError naming
    the item otherwise. Types and ranges are checked when the overrides are applied. A stage's
    section keys are flat, as in a parameter file (``--set temperature=0.7``)."""
    fields = list(config.section_of(cls))
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise config.ParamsError(f"{where} {item!r}: expected KEY=VALUE, e.g. {where} steps=50")
        if key not in fields:
            raise config.ParamsError(f"{where} {key}: unknown key {key!r} for {cls.__name__}; "
                                     f"allowed keys: {sorted(fields)}")
        if key in out:
            raise config.ParamsError(f"{where} {key}: given twice")
        try:
            out[key] = config.parse_yaml_value(text)
        except yaml.YAMLError as exc:
            raise config.ParamsError(f"{where} {key}: {text!r} is not a YAML value: {exc}") from exc
    return out


def load_stage_params(cls: type, path: str, sets: list[str] | None) -> Any:
    """``cls`` from the file ``path`` with the ``--set`` overrides, each checked like the file.
    An error of the file names the file; one of an override names ``--set`` and the key."""
    params = config.load_params(cls, path)
    overrides = parse_sets(sets, cls)
    if not overrides:
        return params
    try:
        return config.load_params(cls, path, **overrides)
    except config.ParamsError as exc:
        given = " ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise config.ParamsError(f"--set {given} (with {path}): {exc}") from exc


def _dry_run(lines: list[str]) -> int:
    print("dry run: nothing was run or written")
    for ln in lines:
        print(f"  would {ln}")
    return 0


# --------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------


def _cmd_data(args: argparse.Namespace) -> int:
    p = load_stage_params(config.DataParams, args.params, args.set)
    print(config.format_params(p))
    from fmr1lib import data

    folder = data.data_dir(p)
    if args.dry_run:
        return _dry_run([f"build the dataset ({p.source}) and save it to {folder}"
                         + (" (replacing the one there)" if folder.exists() else "")])
    dsd, info = data.make_dataset(p)  # FocusShapes or the JSONL records the params name
    folder = data.save_dataset(dsd, folder, p, info)
    print(f"saved {dict(dsd.num_rows)} to {folder}")
    return 0


def _cmd_backbone(args: argparse.Namespace) -> int:
    p = load_stage_params(config.BackboneParams, args.params, args.set)
    print(config.format_params(p))
    owndata.check_warmup_source(p, args.params)  # before the dry run: it would fail the same
    from fmr1lib import stages

    if args.dry_run:
        what = "build the tiny backbone" + (" and warm it up" if p.warmup else "") \
            if p.model_name == "tiny" else f"load {p.model_name}"
        return _dry_run([f"{what} and save it to {stages.run_folder(p, 'backbone', create=False)}"
                         " (the dataset is built first if it is missing)"])
    _, _, info = stages.backbone_stage(p)
    print(info)
    return 0


def _variants(args: argparse.Namespace, cls: type, p: Any) -> list[str]:
    """The variants to run: ``--variants`` (checked against ``cls.VARIANTS``) or the file's."""
    if not args.variants:
        return list(p.variants)
    try:
        config.check_variants("variants", args.variants, cls.VARIANTS)
    except ValueError as exc:
        raise config.ParamsError(f"--variants (with {args.params}): {exc}") from exc
    return list(args.variants)


def _run_variants(args: argparse.Namespace, cls: type, stage_name: str) -> int:
    # Parameters and variants are checked before the stages (torch, the model) are imported.
    p = load_stage_params(cls, args.params, args.set)
    variants = _variants(args, cls, p)
    print(config.format_params(dataclasses.replace(p, variants=variants)))  # those that run
    from fmr1lib import stages

    stage = {"anchor_stage": "anchor", "rl_stage": "rl"}[stage_name]
    if args.dry_run:
        lines = []
        for what, cmd in dict.fromkeys(
                m for v in variants for m in stages.missing_prerequisites(p, stage, v)):
            lines.append(f"{'build' if args.build_missing else 'stop: missing'} {what}"
                         + ("" if args.build_missing else f"; make it with: {cmd}"))
        lines += [f"train {stage} {v} -> {stages.run_folder(p, stage, v, create=False)}"
                  for v in variants]
        return _dry_run(lines)
    # Every variant's start models, before any variant trains: built here (one line each) with
    # --build-missing, else a missing one stops the command with the commands that make it.
    prepare = getattr(stages, "ensure_prerequisites", None)
    if prepare is not None:
        prepare(p, stage, variants, build=args.build_missing)
    run = getattr(stages, stage_name)
    for variant in variants:
        _, _, res = run(p, variant)
        print(f"{variant}: {res.steps} steps in {res.wall_time_s:.1f} s -> {res.out_dir}")
    return 0


def _cmd_anchor(args: argparse.Namespace) -> int:
    return _run_variants(args, config.AnchorParams, "anchor_stage")


def _cmd_rl(args: argparse.Namespace) -> int:
    return _run_variants(args, config.RLParams, "rl_stage")


def _cmd_ablation(args: argparse.Namespace) -> int:
    ep = load_stage_params(config.EvalParams, args.params, args.set)
    print(config.format_params(ep))
    out = Path(args.out) if args.out else run_dir(ep, "ablation", create=False)
    from fmr1lib import ablation, stages

    if args.dry_run:
        missing: dict[Path, str] = {}  # run folder -> line (the backbone row is one run)
        for seed in ep.seeds:
            for row in ep.rows:
                status = stages.run_status(stages.row_params(ep, row, seed), *ablation.ROWS[row])
                if not status:
                    missing.setdefault(status.folder, f"train {row} (seed {seed}) -> "
                                                      f"{status.folder}: {status.reason}")
        return _dry_run([*missing.values(),
                         f"evaluate rows {ep.rows} for seeds {ep.seeds} on {ep.splits} ("
                         f"{len(missing) or 'no'} run(s) to train first) and write "
                         f"ablation.md/.csv to {out}"])

    dsd = stages.stage_data(ep)
    long = ablation.aggregate(ablation.run_ablation(ep, dsd), ep.splits)
    out.mkdir(parents=True, exist_ok=True)
    md, _ = ablation.write_table(long, ep.splits, out)
    print(md.read_text())
    return 0


def _check_profile(args: argparse.Namespace) -> None:
    """``--profile`` names a folder under ``params/`` (ParamsError listing those that exist)."""
    config.check_profile(args.profile, project_root(), "--profile")


def _cmd_notebook(args: argparse.Namespace) -> int:
    _check_profile(args)
    if args.name not in config.PARAMS_BY_NOTEBOOK:
        raise config.ParamsError(f"notebook {args.name!r}: unknown; known: {NOTEBOOK_ORDER}")
    cls = config.PARAMS_BY_NOTEBOOK[args.name]
    overrides = parse_sets(args.set, cls)
    if "profile" in overrides:
        raise config.ParamsError("--set profile: give the profile as --profile")
    nulls = [k for k, v in overrides.items() if v is None]
    if nulls:
        raise config.ParamsError(f"--set {nulls[0]}: null reaches a notebook as 'from the "
                                 f"profile's file'; give a value")
    try:
        params = config.notebook_params(args.name, {"profile": args.profile},
                                        root=project_root(), **overrides)
    except config.ParamsError as exc:
        raise config.ParamsError(f"--set (with {args.name}, profile {args.profile}): {exc}"
                                 if overrides else str(exc)) from exc
    if args.dry_run:
        print(config.params_summary(params, params_file(args.profile, args.name)))
        last = read_times(times_path(args.profile)).get(args.name) or {}
        est = (f" (the last finished run took {_duration(last['total_s'])}: an estimate)"
               if isinstance(last.get("total_s"), (int, float)) else "")
        out = project_root() / "runs" / args.profile / "notebooks" / f"{args.name}.ipynb"
        return _dry_run([f"execute notebooks/{args.name}.ipynb -> {out} and its HTML page "
                         f"{out.with_suffix('.html').name}{est}"])
    run_notebook(args.name, args.profile, kernel=args.kernel, overrides=overrides)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    _check_profile(args)
    names = [n for n in NOTEBOOK_ORDER if params_file(args.profile, n).exists()]
    if not names:
        raise SystemExit(f"no parameter files under params/{args.profile}/")
    # Validate every file first: a typo in the last notebook's params fails in a second.
    for n in names:
        config.load_params(config.PARAMS_BY_NOTEBOOK[n], params_file(args.profile, n))
    where = times_path(args.profile)
    times = read_times(where)
    shown = where.relative_to(project_root()) if where.is_relative_to(project_root()) else where
    if args.dry_run:
        return _dry_run([f"execute notebooks/{n}.ipynb (profile {args.profile}) and write it "
                         f"with its HTML to runs/{args.profile}/notebooks/" for n in names]
                        + reproduce_notes(args.profile)
                        + [f"take {reproduce_estimate(names, times, shown)}"])
    total = time.perf_counter()
    for i, n in enumerate(names):
        print(f"[reproduce] notebook {i + 1}/{len(names)}: {n}; "
              f"{reproduce_estimate(names[i:], times, shown)}", flush=True)
        start = time.perf_counter()
        run_notebook(n, args.profile, kernel=args.kernel)
        print(f"[reproduce] {n}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"[reproduce] all notebooks: {time.perf_counter() - total:.1f} s", flush=True)
    return 0


def _cmd_check_params(args: argparse.Namespace) -> int:
    root = Path(args.params_root) if args.params_root else project_root() / "params"
    n, foreign = 0, []
    for path in sorted(root.glob("*/*.yaml")):
        cls = config.PARAMS_BY_NOTEBOOK.get(path.stem)
        if cls is None:
            continue
        foreign += owndata.foreign_pointers(path, config.load_params(cls, path), project_root())
        n += 1
    for line in foreign:
        print(line, file=sys.stderr)
    if foreign:
        raise config.ParamsError(f"{len(foreign)} *_params_file key(s) under {root} point out of "
                                 f"their profile's folder (first: {foreign[0]}); point them at "
                                 f"the profile's own files")
    print(f"{n} parameter files OK")
    return 0


def _cmd_profile_new(args: argparse.Namespace) -> int:
    jsonl = {}
    for item in args.jsonl:
        split, sep, path = item.partition("=")
        if not sep or not path or split in jsonl:
            raise config.ParamsError(f"--jsonl {item!r}: give SPLIT=FILE once per split")
        jsonl[split] = path
    if args.warmup:
        jsonl["warmup"] = args.warmup
    out, notes = owndata.new_profile(
        args.name, args.base, jsonl, root=project_root(), params_root=args.params_root,
        image_root=args.image_root, allow_outside_root=args.allow_outside_root,
        sets=[*(owndata.QUICK if args.quick else ()), *args.set])
    for note in notes:
        print(f"note: {note}")
    shown = out.relative_to(project_root()) if out.is_relative_to(project_root()) else out
    print(f"wrote {shown}/: every *_params_file points inside it; next: python -m fmr1lib "
          f"check-params, then the stages with --params {shown}/<notebook>.yaml")
    return 0


def _stage_flags(p: argparse.ArgumentParser, params_help: str = "YAML parameter file") -> None:
    p.add_argument("--params", required=True, help=params_help)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one key of the file (YAML value, checked like the file); "
                        "repeatable, e.g. --set steps=50 --set lr=0.001")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved parameters and what would run; run nothing")


def _build_missing_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--build-missing", action="store_true",
                   help=f"build {what} first if it is missing (default: stop and print the "
                        f"command that makes it)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fmr1lib``."""
    parser = argparse.ArgumentParser(prog="python -m fmr1lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a known failure instead of its one line")
    sub = parser.add_subparsers(dest="command", required=True)
    profile_help = (f"a folder under params/: one of {', '.join(config.profiles(project_root()))}"
                    f" (default: tiny)")
    p = sub.add_parser("data", help="build the dataset: FocusShapes or JSONL records (notebook 01's data step)")
    _stage_flags(p)
    p.set_defaults(func=_cmd_data)
    p = sub.add_parser("backbone", help="build/load the backbone and warm it up (notebook 02)")
    _stage_flags(p)
    p.set_defaults(func=_cmd_backbone)
    p = sub.add_parser("anchor", help="stage 1: train the anchoring variants (notebook 03)")
    _stage_flags(p)
    p.add_argument("--variants", nargs="*", metavar="VARIANT",
                   help=f"variants to train, out of {list(config.AnchorParams.VARIANTS)} "
                        f"(default: the file's)")
    _build_missing_flag(p, "the stage-0 backbone")
    p.set_defaults(func=_cmd_anchor)
    p = sub.add_parser("rl", help="stage 2: GRPO variants with the faithful reward (notebook 04)")
    _stage_flags(p)
    p.add_argument("--variants", nargs="*", metavar="VARIANT",
                   help=f"variants to train, out of {list(config.RLParams.VARIANTS)} "
                        f"(default: the file's)")
    _build_missing_flag(p, "the start model (stage-1 focus_anchor model, or the backbone)")
    p.set_defaults(func=_cmd_rl)
    p = sub.add_parser("ablation", help="train what is missing and build the ablation table (notebook 05)")
    _stage_flags(p, "YAML parameter file (05_evaluation)")
    p.add_argument("--out", default=None, help="folder for ablation.md/.csv (default runs/<profile>/ablation)")
    p.set_defaults(func=_cmd_ablation)
    p = sub.add_parser("notebook", help="run one notebook headless on a profile")
    p.add_argument("name", help=f"one of {NOTEBOOK_ORDER}")
    p.add_argument("--profile", default="tiny", metavar="PROFILE", help=profile_help)
    p.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one key of the notebook's parameters (a papermill parameter, "
                        "YAML value, checked like the file); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved parameters and what would run; run nothing")
    p.set_defaults(func=_cmd_notebook)
    p = sub.add_parser("reproduce", help="run every notebook of a profile in order")
    p.add_argument("--profile", default="tiny", metavar="PROFILE", help=profile_help)
    p.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks')")
    p.add_argument("--dry-run", action="store_true",
                   help="check every parameter file, print what would run and the time estimate")
    p.set_defaults(func=_cmd_reproduce)
    p = sub.add_parser("check-params", help="validate every params/*/*.yaml; flag a "
                       "*_params_file that points out of its profile's folder")
    p.add_argument("--params-root", default=None, help="folder of the profiles (default params/)")
    p.set_defaults(func=_cmd_check_params)
    p = sub.add_parser("profile", help="make a profile for your own JSONL data")
    psub = p.add_subparsers(dest="action", required=True)
    p = psub.add_parser("new", help="write params/NAME/ from another profile over JSONL files "
                        "(every record validated first; nothing written on failure)")
    p.add_argument("name", help="the new profile (refused if its folder exists)")
    p.add_argument("--from", dest="base", default="tiny", help="profile to copy (default tiny)")
    p.add_argument("--jsonl", nargs="+", required=True, metavar="SPLIT=FILE",
                   help="records file of each split: train=... test_id=... test_ood=...")
    p.add_argument("--warmup", default=None, metavar="FILE",
                   help="records of the stage-0 warm-up (without it, warmup: false)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder the image paths are relative to (default: each file's folder)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="allow image paths that leave the image root (a symlinked image folder)")
    p.add_argument("--quick", action="store_true",
                   help="a first look, a few minutes on a CPU: " + "; ".join(owndata.QUICK))
    p.add_argument("--set", action="append", default=[], metavar="[NOTEBOOK:]KEY=VALUE",
                   help="write a setting (YAML value) into the notebook's file, or without "
                        "NOTEBOOK: into every file that has KEY; after --quick; repeatable")
    p.add_argument("--params-root", default=None, help="folder of the profiles (default params/)")
    p.set_defaults(func=_cmd_profile_new)
    return parser


ERRORS: tuple[tuple[str, str, int], ...] = (
    ("fmr1lib.config", "ParamsError", 2),
    ("fmr1lib.stages", "MissingPrerequisiteError", 3),
    ("fmr1lib.train", "ResumeMismatchError", 4),
    ("fmr1lib.runlock", "RunLockedError", 5),
    ("fmr1lib.checkpoints", "CheckpointError", 6),
    ("fmr1lib.train", "NonFiniteLossError", 7),
    ("fmr1lib.records", "DataError", 2),
)
"""``(module, error class, exit status)`` of every known failure: ``main`` prints it as one
line ``<class>: <message>`` (the message names the file, key, record or step) with its status, and
no traceback unless ``--debug``. Bad input, a params file or a data record, is status 2 (the
usual status of a command given input it cannot use); anything else is a bug and keeps its
traceback (status 1)."""


def _known_error(exc: BaseException) -> tuple[str, int] | None:
    """``(class name, exit status)`` of ``exc`` if it is one of ``ERRORS`` (modules that were
    never imported raised nothing)."""
    for module, name, status in ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return name, status
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fmr1lib``.

    Returns:
        0 on success; for a known failure (``ERRORS``) its status: 2 a ``ParamsError`` (a bad
        file, flag or override), 3 a missing start model without ``--build-missing``, 4 a
        refused resume, 5 a run folder locked by another run, 6 no valid checkpoint, 7 a
        non-finite loss; 2 also for bad data records (``DataError``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - known failures get one line, others re-raise
        known = _known_error(exc)
        if known is None or debug:
            raise
        name, status = known
        print(f"{name}: {exc}", file=sys.stderr)
        return status
