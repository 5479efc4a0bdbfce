"""Command line: run any stage or notebook headless.

    python -m fmr1lib data --params params/tiny/01_data_construction.yaml
    python -m fmr1lib backbone --params params/tiny/02_backbone.yaml
    python -m fmr1lib anchor --params params/tiny/03_anchoring.yaml
    python -m fmr1lib rl --params params/tiny/04_counterfactual_rl.yaml
    python -m fmr1lib ablation --params params/tiny/05_evaluation.yaml
    python -m fmr1lib notebook 01_data_construction --profile tiny
    python -m fmr1lib reproduce --profile tiny
    python -m fmr1lib check-params

Stages run the same library calls as their notebooks, so ``accelerate launch -m fmr1lib
<stage> --params FILE`` runs them on GPUs. Every command validates its parameter files (unknown
keys, wrong types, values out of range), ``--variants`` (known variants, each once) and
``--profile`` (a folder under ``params/``; an unknown one lists those that exist) *before* any
work: an error exits with status 2 and a ``ParamsError`` line naming the file or flag and the key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from fmr1lib import config
from fmr1lib.repro import project_root, run_dir

logger = logging.getLogger("fmr1lib")

NOTEBOOK_ORDER = list(config.PARAMS_BY_NOTEBOOK)


def params_file(profile: str, notebook: str) -> Path:
    """``params/<profile>/<notebook>.yaml`` under the project root."""
    return config.notebook_params_file(profile, notebook, project_root())


def run_notebook(notebook: str, profile: str, out_dir: Path | None = None,
                 kernel: str | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Validate the profile's parameter file and ``overrides``, then execute the notebook.

    Papermill injects only ``profile`` and ``overrides``: the notebook reads every other value
    from ``params/<profile>/<notebook>.yaml`` itself (``config.notebook_params``), so the
    executed notebook does not repeat the file.

    Papermill writes the executed notebook as it goes and marks it finished even when a cell
    fails, so it writes to ``<notebook>.partial.ipynb`` next to the output, which is renamed to
    ``<notebook>.ipynb`` only when every cell ran. An earlier output is removed first: the
    notebook resets its results file when it starts, so ``<notebook>.ipynb`` exists only for
    a run that finished, and an interrupted run leaves only the ``.partial`` one.

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
    out_dir = out_dir or (root / "runs" / profile / "notebooks")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{notebook}.ipynb"
    partial = out_dir / f"{notebook}.partial.ipynb"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    papermill.execute_notebook(
        str(root / "notebooks" / f"{notebook}.ipynb"), str(partial),
        parameters={"profile": profile, **overrides}, cwd=str(root / "notebooks"),
        kernel_name=kernel, progress_bar=False, log_output=False)
    if partial.exists():  # papermill wrote it (always, unless replaced by a stand-in)
        os.replace(partial, out)
    logger.info("%s done in %.1f s -> %s", notebook, time.perf_counter() - start, out)
    return out


def _cmd_data(args: argparse.Namespace) -> int:
    from fmr1lib import data

    p = config.load_params(config.DataParams, args.params)
    print(config.format_params(p))
    dsd, info = data.make_dataset(p)  # FocusShapes or the JSONL records the params name
    folder = data.save_dataset(dsd, data.data_dir(p), p, info)
    print(f"saved {dict(dsd.num_rows)} to {folder}")
    return 0


def _cmd_backbone(args: argparse.Namespace) -> int:
    from fmr1lib import stages

    p = config.load_params(config.BackboneParams, args.params)
    print(config.format_params(p))
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
    p = config.load_params(cls, args.params)
    variants = _variants(args, cls, p)
    print(config.format_params(p))
    from fmr1lib import stages

    stage = getattr(stages, stage_name)
    for variant in variants:
        _, _, res = stage(p, variant)
        print(f"{variant}: {res.steps} steps in {res.wall_time_s:.1f} s -> {res.out_dir}")
    return 0


def _cmd_anchor(args: argparse.Namespace) -> int:
    return _run_variants(args, config.AnchorParams, "anchor_stage")


def _cmd_rl(args: argparse.Namespace) -> int:
    return _run_variants(args, config.RLParams, "rl_stage")


def _cmd_ablation(args: argparse.Namespace) -> int:
    from fmr1lib import ablation, stages

    ep = config.load_params(config.EvalParams, args.params)
    print(config.format_params(ep))
    dsd = stages.stage_data(ep)
    long = ablation.aggregate(ablation.run_ablation(ep, dsd), ep.splits)
    out = Path(args.out) if args.out else run_dir(ep, "ablation")
    md, _ = ablation.write_table(long, ep.splits, out)
    print(md.read_text())
    return 0


def _check_profile(args: argparse.Namespace) -> None:
    """``--profile`` names a folder under ``params/`` (ParamsError listing those that exist)."""
    config.check_profile(args.profile, project_root(), "--profile")


def _cmd_notebook(args: argparse.Namespace) -> int:
    _check_profile(args)
    run_notebook(args.name, args.profile, kernel=args.kernel)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    _check_profile(args)
    names = [n for n in NOTEBOOK_ORDER if params_file(args.profile, n).exists()]
    if not names:
        raise SystemExit(f"no parameter files under params/{args.profile}/")
    # Validate every file first: a typo in the last notebook's params fails in a second.
    for n in names:
        config.load_params(config.PARAMS_BY_NOTEBOOK[n], params_file(args.profile, n))
    total = time.perf_counter()
    for n in names:
        start = time.perf_counter()
        run_notebook(n, args.profile, kernel=args.kernel)
        print(f"[reproduce] {n}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"[reproduce] all notebooks: {time.perf_counter() - total:.1f} s", flush=True)
    return 0


def _cmd_check_params(args: argparse.Namespace) -> int:
    root = project_root() / "params"
    n = 0
    for path in sorted(root.glob("*/*.yaml")):
        cls = config.PARAMS_BY_NOTEBOOK.get(path.stem)
        if cls is None:
            continue
        config.load_params(cls, path)
        n += 1
    print(f"{n} parameter files OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fmr1lib``."""
    parser = argparse.ArgumentParser(prog="python -m fmr1lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="generate FocusShapes (notebook 01's data step)")
    p.add_argument("--params", required=True, help="YAML parameter file")
    p.set_defaults(func=_cmd_data)
    p = sub.add_parser("backbone", help="build/load the backbone and warm it up (notebook 02)")
    p.add_argument("--params", required=True, help="YAML parameter file")
    p.set_defaults(func=_cmd_backbone)
    p = sub.add_parser("anchor", help="stage 1: train the anchoring variants (notebook 03)")
    p.add_argument("--params", required=True, help="YAML parameter file")
    p.add_argument("--variants", nargs="*", metavar="VARIANT",
                   help=f"variants to train, out of {list(config.AnchorParams.VARIANTS)} "
                        f"(default: the file's)")
    p.set_defaults(func=_cmd_anchor)
    p = sub.add_parser("rl", help="stage 2: GRPO variants with the faithful reward (notebook 04)")
    p.add_argument("--params", required=True, help="YAML parameter file")
    p.add_argument("--variants", nargs="*", metavar="VARIANT",
                   help=f"variants to train, out of {list(config.RLParams.VARIANTS)} "
                        f"(default: the file's)")
    p.set_defaults(func=_cmd_rl)
    p = sub.add_parser("ablation", help="train what is missing and build the ablation table (notebook 05)")
    p.add_argument("--params", required=True, help="YAML parameter file (05_evaluation)")
    p.add_argument("--out", default=None, help="folder for ablation.md/.csv (default runs/<profile>/ablation)")
    p.set_defaults(func=_cmd_ablation)
    p = sub.add_parser("notebook", help="run one notebook headless on a profile")
    p.add_argument("name", help=f"one of {NOTEBOOK_ORDER}")
    p.add_argument("--profile", default="tiny", help="a folder under params/")
    p.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    p.set_defaults(func=_cmd_notebook)
    p = sub.add_parser("reproduce", help="run every notebook of a profile in order")
    p.add_argument("--profile", default="tiny", help="a folder under params/")
    p.add_argument("--kernel", default=None)
    p.set_defaults(func=_cmd_reproduce)
    p = sub.add_parser("check-params", help="validate every params/*/*.yaml")
    p.set_defaults(func=_cmd_check_params)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except config.ParamsError as exc:
        print(f"ParamsError: {exc}", file=sys.stderr)
        return 2
