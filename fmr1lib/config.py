"""Parameter files: how every stage's parameters are read, checked and shown.

The dataclasses live in ``stage_params`` (one per notebook / stage) and ``params_common`` (the
pieces they share); every parameter has exactly one default, documented there.
``params/<profile>/NN_*.yaml`` hold only what a profile sets differently (plus ``profile`` and
the pointers to the other stages' files), and a notebook's ``parameters`` cell names only the
few knobs its text is about, set to ``None`` ("from the profile's file"). ``load_params`` builds
a dataclass from a YAML file or a dict; ``notebook_params`` is what the notebooks call: the
profile's file, then the values the notebook (or papermill) sets. Both reject unknown keys,
values of the wrong type or outside their choice set (``fmr1lib.choices``), values out of range
(counts, rates, probabilities; nan and inf anywhere), duplicate YAML keys and layer or head
indices the backbone does not have *before any work starts*, naming the file and the key.
Keys are flat: a stage's sections (``RLParams.reward``) are set by their fields' own names
(``section_of``).

This module is the one door to the parameters: the stages' dataclasses are imported here, and
the rest of the package names them as ``config.RLParams`` and so on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fmr1lib import repro
from fmr1lib.params_common import (
    ADDED_AT,
    PARAMS_ROOT,
    PROFILE_NAME,
    TRACKERS,
    BuildParams,
    CommonParams,
    ModelParams,
    ParamsError,
    check_profile_name,
    check_ranges,
    check_variants,
    without_added_defaults,
)
from fmr1lib.stage_params import (
    ABLATION_ROW_LABELS,
    ABLATION_ROWS,
    AnchorParams,
    BackboneParams,
    DataParams,
    EvalParams,
    PolicyLossParams,
    RewardParams,
    RLParams,
    RolloutParams,
)

__all__ = ["ADDED_AT", "ABLATION_ROW_LABELS", "ABLATION_ROWS", "PARAMS_ROOT", "PROFILE_NAME", "TRACKERS",
           "AnchorParams", "BackboneParams", "BuildParams", "DataParams", "EvalParams", "ModelParams",
           "ParamsError", "PolicyLossParams", "RLParams", "RewardParams", "RolloutParams",
           "check_profile_name", "check_variants", "without_added_defaults"]

T = TypeVar("T")


PARAMS_BY_NOTEBOOK: dict[str, type] = {
    "01_data_construction": DataParams,
    "02_backbone": BackboneParams,
    "03_anchoring": AnchorParams,
    "04_counterfactual_rl": RLParams,
    "05_evaluation": EvalParams,
}
"""The dataclass of each notebook's parameters (``notebook_params``, ``cli.run_notebook``)."""


# --------------------------------------------------------------------------------------
# Loading and type checking
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (only int -> float), or raise ParamsError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _check(value, arg, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{where}: expected None, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ParamsError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{where}: expected bool, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{where}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ParamsError(f"{where}: expected a finite float, got {value!r}")
            return float(value)
        raise ParamsError(f"{where}: expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{where}: expected str, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_check(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _check(k, key_tp, f"{where} key"): _check(v, val_tp, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    raise ParamsError(f"{where}: unsupported parameter type {_type_name(tp)}")


class _DuplicateKey(yaml.YAMLError):
    """A mapping of a parameter file that sets one key twice."""

    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {key!r} is set twice (lines {first} and {again})")
        self.key, self.first, self.again = key, first, again


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping may not set a key twice (the plain loader
    keeps the last value silently). A merge (``<<``) may still be overridden by the mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads ``1e-4`` as a string: it wants a dot in a float's mantissa. YAML 1.2
# and every reader of these files take it for the number it looks like.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml_value(text: str) -> Any:
    """One YAML value as the parameter files read it (``1e-4`` a float, ``[a, b]`` a list)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def _read_yaml(path: Path) -> dict:
    """The mapping of a parameter file: UTF-8 YAML, no key set twice, not empty (``{}`` is
    the explicit "all defaults")."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read parameter file ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); parameter "
                          f"files are UTF-8 YAML") from exc
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ParamsError(f"{path}: key {exc.key!r} is set twice (lines {exc.first} and "
                          f"{exc.again}); set it once") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML ({exc})") from exc
    if data is None:
        raise ParamsError(f"{path}: no parameters (the file is empty or only comments); name "
                          f"at least its profile (profile: ...), or write {{}} for all defaults")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter names to values, "
                          f"got {type(data).__name__}")
    return data


def sections(cls: type) -> dict[str, type]:
    """The sections of a params dataclass: its fields that hold a dataclass (``RLParams.reward``
    holds a ``RewardParams``), by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name])}


@functools.cache
def _keys(cls: type) -> dict[str, tuple[str | None, Any]]:
    """Every key a parameter file of ``cls`` may set -> ``(section, type)``: the section holding
    it (None: ``cls`` itself) and its declared type. Keys are flat: a section's fields are set by
    their own names, so no two places of one stage may share a name (checked here)."""
    out: dict[str, tuple[str | None, Any]] = {}
    parts = sections(cls)
    for name, owner in [(None, cls), *parts.items()]:
        hints = typing.get_type_hints(owner)
        for f in dataclasses.fields(owner):
            if name is None and f.name in parts:
                continue
            if f.name in out:
                raise TypeError(f"{cls.__name__}: key {f.name!r} is defined twice")
            out[f.name] = (name, hints[f.name])
    return out


def section_of(cls: type) -> dict[str, str | None]:
    """Every key a parameter file of ``cls`` may set -> the section holding it (None: ``cls``
    itself)."""
    return {key: section for key, (section, _) in _keys(cls).items()}


def _build(cls: type[T], values: Mapping[str, Any], origin: str) -> T:
    """``cls`` from flat ``values`` after the key, type and value checks; errors start with
    ``origin``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    keys = _keys(cls)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ParamsError(
            f"{origin}: unknown key(s) {unknown} for {cls.__name__}; "
            f"allowed keys: {sorted(keys)}"
        )
    checked = {k: _check(v, keys[k][1], f"{origin}: key {k!r}") for k, v in values.items()}
    top = {k: v for k, v in checked.items() if keys[k][0] is None}
    parts = sections(cls)
    for name, part in parts.items():
        top[name] = part(**{k: v for k, v in checked.items() if keys[k][0] == name})
    params = cls(**top)
    checks = [getattr(obj, n, None) for obj in (params, *(top[name] for name in parts))
              for n in ("validate_common", "validate")]
    for validate in [*checks, lambda: check_ranges(params)]:
        if callable(validate):
            try:
                validate()
            except ValueError as exc:
                raise ParamsError(f"{origin}: {exc}") from exc
    _check_against_backbone(params, origin)
    return params


def replace_values(params: T, **values: Any) -> T:
    """``params`` with flat ``values`` changed (``dataclasses.replace`` through the sections);
    no checks: what a script does to params already loaded."""
    where = section_of(type(params))
    unknown = sorted(set(values) - set(where))
    if unknown:
        raise ParamsError(f"unknown key(s) {unknown} for {type(params).__name__}")
    top = {k: v for k, v in values.items() if where[k] is None}
    for name in sections(type(params)):
        mine = {k: v for k, v in values.items() if where[k] == name}
        if mine:
            top[name] = dataclasses.replace(getattr(params, name), **mine)
    return dataclasses.replace(params, **top)


def load_params(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                **overrides: Any) -> T:
    """Build ``cls`` from a YAML file or a dict; every field it does not set keeps its default.

    Args:
        cls: a parameter dataclass, e.g. ``DataParams``.
        source: path of a YAML file, or a mapping. ``None`` means the defaults.
        **overrides: values applied last, checked like the rest.

    Returns:
        An instance of ``cls`` whose every field has the declared type.

    Raises:
        ParamsError: unknown key, wrong type, value out of range, unreadable, empty, non-UTF-8
            or invalid YAML, a key set twice, a layer or head index the backbone lacks; the
            message names the file (or ``<dict>``) and the key.
    """
    if source is None:
        origin, values = "<defaults>", {}
    elif isinstance(source, (str, Path)):
        origin, values = str(source), _read_yaml(Path(source))
        check_file_profile(Path(source), values)
    else:
        origin, values = "<dict>", dict(source)
    return _build(cls, {**values, **overrides}, origin)


def load_pointed(cls: type[T], path: str | Path, key: str, **overrides: Any) -> T:
    """``load_params(cls, path, **overrides)`` for the file a pointer ``key`` names: an error
    names the key too (a ``backbone_params_file`` that leads to another stage's file)."""
    try:
        return load_params(cls, path, **overrides)
    except ParamsError as exc:
        raise ParamsError(f"key {key!r} points at {path}, which is not a {cls.__name__} "
                          f"file: {exc}") from exc


def check_file_profile(path: Path, values: Mapping[str, Any]) -> None:
    """A file of a profile folder (``params/<profile>/*.yaml``) that names a ``profile`` names
    its folder's (ParamsError naming the file otherwise)."""
    folder = Path(path).resolve().parent
    named = values.get("profile")
    if folder.parent.name == "params" and isinstance(named, str) and named != folder.name:
        raise ParamsError(f"{path}: key 'profile' is {named!r}, but the file is in the "
                          f"{folder.name!r} profile folder")


def notebook_params_file(profile: str, notebook: str, root: str | Path | None = None) -> Path:
    """``params/<profile>/<notebook>.yaml`` under ``root`` (default: ``PARAMS_ROOT``)."""
    return Path(root if root is not None else PARAMS_ROOT) / "params" / profile / f"{notebook}.yaml"


def profiles(root: str | Path | None = None) -> list[str]:
    """The profiles under ``<root>/params/``: folders holding a notebook's parameter file."""
    folder = Path(root if root is not None else PARAMS_ROOT) / "params"
    if not folder.is_dir():
        return []
    return sorted(d.name for d in folder.iterdir()
                  if d.is_dir() and any((d / f"{nb}.yaml").is_file() for nb in PARAMS_BY_NOTEBOOK))


def check_profile(profile: Any, root: str | Path | None = None,
                  where: str = "key 'profile'") -> str:
    """``profile`` if it names a profile folder under ``<root>/params/``, else ParamsError naming
    ``where`` and listing the profiles that exist."""
    if not isinstance(profile, str):
        raise ParamsError(f"{where}: expected str, got {profile!r}")
    try:
        check_profile_name(profile, where)
    except ValueError as exc:
        raise ParamsError(str(exc)) from exc
    known = profiles(root)
    if profile not in known:
        folder = Path(root if root is not None else PARAMS_ROOT) / "params"
        raise ParamsError(f"{where}: no profile {profile!r} under {folder}; profiles: {known}")
    return profile


# --------------------------------------------------------------------------------------
# Layer and head indices against the backbone, before any weights load
# --------------------------------------------------------------------------------------

KNOWN_CHECKPOINTS: dict[str, tuple[int, int]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": (36, 16),
    "Qwen/Qwen2.5-VL-7B-Instruct": (28, 28),
}
"""(decoder layers, attention heads) of the hub checkpoints the GPU profiles name, from their
``config.json``: used when that file is neither a local folder's nor in the hub cache."""

LAYER_KEYS = ("anchor_layers", "reward_layers", "eval_layers")
"""Fields holding decoder-layer selections (``check_indices``)."""


def shape_from_config(cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    """(decoder layers, attention heads) of a transformers ``config.json`` (its ``text_config``
    where it has one), or None if it does not say."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else {}
    layers = text.get("num_hidden_layers", cfg.get("num_hidden_layers"))
    heads = text.get("num_attention_heads", cfg.get("num_attention_heads"))
    if isinstance(layers, int) and isinstance(heads, int):
        return layers, heads
    return None


def backbone_shape(bp: ModelParams) -> tuple[int, int, str] | None:
    """(decoder layers, attention heads, where they come from) of the backbone ``bp`` names,
    known without loading weights, or None.

    ``tiny``: ``num_layers`` / ``num_heads``. A local checkpoint folder: its ``config.json``. A
    hub id: its ``config.json`` if the hub cache holds it (no download), else
    ``KNOWN_CHECKPOINTS``. None otherwise: the indices are then checked only once the model has
    loaded (``attention.resolve_layers``); ``check_indices(p, n_layers, n_heads, ...)`` is the
    same check for a loader to run on the config before the weights.
    """
    if bp.model_name == "tiny":
        return bp.num_layers, bp.num_heads, "its num_layers / num_heads"
    name = Path(bp.model_name)
    candidates = [name] if name.is_absolute() else [Path.cwd() / name, PARAMS_ROOT / name]
    cfg_file = next((c / "config.json" for c in candidates if (c / "config.json").is_file()), None)
    if cfg_file is None and not name.is_absolute():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(bp.model_name, "config.json")
            cfg_file = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a repo id, or no hub client: nothing known
            cfg_file = None
    if cfg_file is not None:
        try:
            shape = shape_from_config(json.loads(cfg_file.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            shape = None
        if shape is not None:
            return (*shape, str(cfg_file))
    if bp.model_name in KNOWN_CHECKPOINTS:
        return (*KNOWN_CHECKPOINTS[bp.model_name], f"the known config of {bp.model_name}")
    return None


def check_indices(p: Any, n_layers: int, n_heads: int, source: str, origin: str) -> None:
    """Every explicit layer index of ``p`` (``LAYER_KEYS``) is one of the ``n_layers`` decoder
    layers (negative: from the end, each layer once) and every ``head_select`` index one of the
    ``n_heads`` heads; ParamsError starting with ``origin`` and naming the key otherwise."""
    values = params_to_dict(p)
    for key in LAYER_KEYS:
        spec = values.get(key)
        if not isinstance(spec, list):
            continue
        bad = [i for i in spec if not -n_layers <= i < n_layers]
        if bad:
            raise ParamsError(f"{origin}: key {key!r}: layer index {bad} out of range: the backbone "
                              f"has {n_layers} decoder layers (0..{n_layers - 1} or "
                              f"-{n_layers}..-1; from {source})")
        resolved = [i % n_layers for i in spec]
        if len(set(resolved)) != len(resolved):
            raise ParamsError(f"{origin}: key {key!r}: {spec} names one of the {n_layers} layers "
                              f"twice (negative indices count from the end)")
    heads = getattr(p, "head_select", None)
    if isinstance(heads, list):
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise ParamsError(f"{origin}: key 'head_select': head index {bad} out of range: the "
                              f"backbone has {n_heads} attention heads (0..{n_heads - 1}; from "
                              f"{source})")


def _upstream_backbone(p: Any) -> tuple[Any, str] | None:
    """The ``BackboneParams`` ``p``'s pointers lead to (``backbone_params_file``, or the
    ``anchor_params_file``'s), with their file; None where a pointed file does not exist (the
    stage reports that when it reads it)."""
    for key, cls in (("backbone_params_file", BackboneParams), ("anchor_params_file", AnchorParams)):
        name = getattr(p, key, None)
        if not name:
            continue
        path = Path(name) if Path(name).is_absolute() else PARAMS_ROOT / name
        if not path.is_file():
            return None
        up = load_pointed(cls, path, key)
        return (up, name) if cls is BackboneParams else _upstream_backbone(up)
    return None


def _check_against_backbone(p: Any, origin: str) -> None:
    """``check_indices`` of ``p`` against the backbone its pointers name, where its shape is
    known without loading it (``backbone_shape``)."""
    values = params_to_dict(p)
    explicit = [k for k in (*LAYER_KEYS, "head_select") if isinstance(values.get(k), list)]
    if not explicit:
        return
    found = _upstream_backbone(p)
    if found is None:
        return
    bp, name = found
    shape = backbone_shape(bp)
    if shape is None:
        return
    n_layers, n_heads, source = shape
    check_indices(p, n_layers, n_heads, f"{name}: {source}" if bp.model_name == "tiny" else source,
                  origin)


def notebook_params(notebook: str, namespace: Mapping[str, Any] | None = None, *,
                    root: str | Path | None = None, **overrides: Any) -> Any:
    """The parameters a notebook runs with: its profile's file, then the notebook's own values.

    A notebook calls ``config.notebook_params("03_anchoring", globals())``. Its ``parameters``
    cell sets ``profile`` and a few knobs to ``None``, meaning "from the profile's file"; papermill
    (``-p``, or ``cli.run_notebook``'s overrides) injects values after that cell.

    Args:
        notebook: a key of ``PARAMS_BY_NOTEBOOK``, e.g. ``"03_anchoring"``.
        namespace: the notebook's ``globals()``. ``profile`` selects
            ``params/<profile>/<notebook>.yaml`` (default ``tiny``); every other name that is a
            field of the notebook's dataclass and is not None overrides the file. Other names
            (imports, variables) are ignored.
        root: the folder holding ``params/`` (default: ``PARAMS_ROOT``).
        **overrides: further values; unlike the namespace, each must be a field.

    Returns:
        The notebook's dataclass (``PARAMS_BY_NOTEBOOK[notebook]``), checked like ``load_params``.

    Raises:
        ParamsError: unknown notebook, a profile that is not a folder under ``params/`` (the
            message lists those that are), missing file, a file that does not name its profile
            or whose ``profile`` is not its folder's, or a value that does not fit the dataclass;
            the message names the file and the key.
    """
    if notebook not in PARAMS_BY_NOTEBOOK:
        raise ParamsError(f"unknown notebook {notebook!r}; known: {list(PARAMS_BY_NOTEBOOK)}")
    cls = PARAMS_BY_NOTEBOOK[notebook]
    namespace = namespace or {}
    profile = overrides.pop("profile", None) or namespace.get("profile") or CommonParams.profile
    check_profile(profile, root, f"<notebook {notebook}>: key 'profile'")
    path = notebook_params_file(profile, notebook, root)
    if not path.exists():
        raise ParamsError(f"{path}: no parameter file for notebook {notebook!r} "
                          f"in profile {profile!r}")
    values = _read_yaml(path)
    if "profile" not in values:
        raise ParamsError(f"{path}: key 'profile' missing: a profile's file names its profile "
                          f"(profile: {profile})")
    params = _build(cls, values, str(path))  # errors in the file name the file
    if params.profile != profile:
        raise ParamsError(f"{path}: key 'profile' is {params.profile!r}, but the file is in the "
                          f"{profile!r} profile folder")
    fields = [k for k in section_of(cls) if k != "profile"]
    set_here = {k: namespace[k] for k in fields if namespace.get(k) is not None}
    set_here.update(overrides)
    if not set_here:
        return params
    return _build(cls, {**values, **set_here}, f"{path} (overrides)")


def params_to_dict(params: Any) -> dict[str, Any]:
    """The resolved parameters as a flat dict, as a parameter file names them (for printing,
    hashing and storing with artifacts; ``repro.params_dict``)."""
    return repro.params_dict(params)


def format_params(params: Any) -> str:
    """A readable YAML dump of the resolved parameters, headed by the class name."""
    body = yaml.safe_dump(params_to_dict(params), sort_keys=False, default_flow_style=None)
    return f"# {type(params).__name__}\n{body}"


def params_summary(params: Any, source: str | Path | None = None) -> str:
    """A few lines on a notebook's parameters: the file, what differs from the defaults, a count.

    Args:
        params: a parameter dataclass.
        source: the YAML file it was read from (default: ``params/<profile>/<notebook>.yaml``,
            the file ``notebook_params`` reads for its class).

    Returns:
        One line naming the class, the file and how many fields differ from the defaults in
        ``fmr1lib/config.py``, then one line per such field; a value that is not the file's
        (a notebook override) is marked with what the file gives.
    """
    cls = type(params)
    if source is None:
        notebook = next((nb for nb, c in PARAMS_BY_NOTEBOOK.items() if c is cls), None)
        source = notebook_params_file(params.profile, notebook) if notebook else None
    values, defaults = params_to_dict(params), params_to_dict(cls())
    from_file = params_to_dict(load_params(cls, source)) if source is not None else defaults
    shown = [k for k in values if values[k] != defaults[k] or values[k] != from_file[k]]
    where = "the defaults"
    if source is not None:
        where = Path(source).resolve()
        if where.is_relative_to(PARAMS_ROOT):
            where = where.relative_to(PARAMS_ROOT)
    n_diff = sum(values[k] != defaults[k] for k in values)
    lines = [f"{cls.__name__} from {where}: {len(values)} parameters, {n_diff} differ from the "
             f"defaults in fmr1lib/config.py"]
    for k in shown:
        line = f"  {k}: {_flow(values[k])}"
        if values[k] != from_file[k]:
            line += f"  # override; the file gives {_flow(from_file[k])}"
        lines.append(line)
    return "\n".join(lines)


def _flow(value: Any) -> str:
    """``value`` as one line of YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("...\n").strip()
