"""The package's layering: a module imports only modules of a lower layer (or those listed below).

Every ``import`` of ``fmr1lib/*.py`` (module level or inside a function, absolute or relative)
is read with ``ast``, so the check costs no import of torch. A failure names the importer, its
line, the imported module and the rule broken. To change the layout, edit the tables right below;
a new module must be placed in ``LAYERS`` before its tests pass.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = "fmr1lib"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Layers, lowest first. A module may import any module of a lower layer, and within its own
# layer only what SAME_LAYER lists. ``__init__`` runs before any submodule: it imports none.
LAYERS: dict[str, tuple[str, ...]] = {
    "package": ("__init__",),
    # The vocabulary: every choice set, imported by any module; it imports nothing.
    "L-1 vocabulary": ("choices",),
    "L0 primitives": ("config", "params_common", "stage_params", "repro", "records", "converters", "counterfactual", "prompting",
                      "scoring", "rewards", "data", "modeling", "attention", "batching", "runlock",
                      "progress", "checkpoints", "owndata", "rollouts", "vllm_backend"),
    # The training skeleton is infrastructure: the method modules hand it their step functions.
    "L1 train": ("train",),
    "L2 method": ("anchoring", "occlusion", "faithful", "reading", "grpo_stats", "grpo"),
    "L2.5 evaluation": ("evaluation", "benchmark", "validity"),
    "L3 stages": ("stages",),
    # L4 is empty: evaluation and benchmark sit at L2.5.
    "L5 experiments": ("ablation", "claims", "plotting", "study_plots"),
    "L6 entry points": ("cli", "__main__"),
}

# Imports allowed inside one layer (importer -> modules of its own layer it may import).
SAME_LAYER: dict[str, set[str]] = {
    "config": {"repro", "params_common", "stage_params"},
    "params_common": {"repro"},
    "stage_params": {"params_common"},
    "data": {"config", "repro", "records", "counterfactual", "progress"},
    "modeling": {"config", "prompting", "repro"},
    "records": {"repro"},
    "converters": {"records", "repro"},
    "owndata": {"config", "records"},
    "runlock": {"repro"},
    "checkpoints": {"repro"},
    "scoring": {"prompting", "records"},
    "rewards": {"prompting", "scoring"},
    "batching": {"attention", "modeling", "prompting", "records"},
    "rollouts": {"batching", "modeling"},
    "vllm_backend": {"modeling", "prompting", "rollouts"},
    "faithful": {"anchoring", "occlusion"},
    "reading": {"faithful"},
    "grpo": {"anchoring", "faithful", "grpo_stats", "reading"},
    "benchmark": {"evaluation"},
    "ablation": {"claims", "plotting"},
    "study_plots": {"plotting"},
    "__main__": {"cli"},
}

_BASE = set(LAYERS["package"]) | set(LAYERS["L-1 vocabulary"]) | set(LAYERS["L0 primitives"])

# Modules whose imports are narrower than their layer allows: they may import only these.
# Evaluation needs models and data, never the trainers: no grpo, train or stages.
ONLY: dict[str, set[str]] = {
    "evaluation": _BASE | {"anchoring", "faithful"},
    "benchmark": _BASE | {"anchoring", "faithful", "evaluation"},
}


# --------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------


def _layer_of(layers: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[int, str]]:
    return {m: (i, name) for i, (name, mods) in enumerate(layers.items()) for m in mods}


def _modules_on_disk(package_dir: Path) -> list[str]:
    return sorted(p.stem for p in package_dir.glob("*.py"))


def imported_modules(path: Path, package: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a module of ``package`` in the file at ``path``.

    ``module`` is the submodule's name (``"grpo"`` for ``fmr1lib.grpo.x``); a name imported from
    the package itself (``from fmr1lib import x``) is the submodule ``x`` when ``x`` is in
    ``known``, else an attribute of the package: ``"__init__"``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return sorted(_imports(tree, package, known), key=lambda found: found[0])


def _imports(tree: ast.AST, package: str, known: set[str]) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package:
                    yield node.lineno, parts[1] if len(parts) > 1 else "__init__"
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue  # above the package: not one of its modules
            if node.level == 1:  # relative to the package: "from . import x", "from .x import y"
                parts = [package, *node.module.split(".")] if node.module else [package]
            else:
                parts = (node.module or "").split(".")
            if parts[0] != package:
                continue
            if len(parts) > 1:
                yield node.lineno, parts[1]
            else:
                for alias in node.names:
                    yield node.lineno, alias.name if alias.name in known else "__init__"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if (name == "import_module" and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str) and arg.value.split(".")[0] == package):
                parts = arg.value.split(".")
                yield node.lineno, parts[1] if len(parts) > 1 else "__init__"


def layering_violations(package_dir: Path, package: str, layers: Mapping[str, tuple[str, ...]],
                        same_layer: Mapping[str, set[str]],
                        only: Mapping[str, set[str]]) -> list[str]:
    """One line per import that breaks the rules, ``path:line: importer [layer] imports ...``."""
    layer = _layer_of(layers)
    known = set(layer) | set(_modules_on_disk(package_dir))
    out = []
    for importer in _modules_on_disk(package_dir):
        if importer not in layer:
            continue  # reported by unplaced_modules
        path = package_dir / f"{importer}.py"
        rank, lname = layer[importer]
        for line, imported in imported_modules(path, package, known):
            if imported == importer:
                continue
            where = f"{package}/{importer}.py:{line}: {importer} [{lname}] imports {imported}"
            if imported not in layer:
                out.append(f"{where}, which is not placed in LAYERS")
                continue
            irank, iname = layer[imported]
            where += f" [{iname}]"
            if importer in only:
                if imported not in only[importer]:
                    out.append(f"{where}: not among the modules ONLY[{importer!r}] allows")
            elif irank > rank:
                out.append(f"{where}: a higher layer")
            elif irank == rank and imported not in same_layer.get(importer, set()):
                out.append(f"{where}: same layer, not allowed by SAME_LAYER[{importer!r}]")
    return out


def unplaced_modules(package_dir: Path, layers: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Modules of the package that no layer lists."""
    layer = _layer_of(layers)
    return [m for m in _modules_on_disk(package_dir) if m not in layer]


def table_problems(layers: Mapping[str, tuple[str, ...]], same_layer: Mapping[str, set[str]],
                   only: Mapping[str, set[str]]) -> list[str]:
    """Inconsistencies of the rule tables themselves."""
    out = []
    seen: dict[str, str] = {}
    for name, mods in layers.items():
        for m in mods:
            if m in seen:
                out.append(f"{m} is in layer {seen[m]!r} and in layer {name!r}")
            seen[m] = name
    for importer, allowed in same_layer.items():
        for m in sorted(allowed):
            if importer not in seen or m not in seen or seen[importer] != seen[m]:
                out.append(f"SAME_LAYER[{importer!r}] lists {m!r}, not a module of its layer")
    for importer, allowed in only.items():
        out += [f"ONLY[{importer!r}] lists {m!r}, not in LAYERS"
                for m in sorted(allowed) if m not in seen]
        if importer not in seen:
            out.append(f"ONLY has {importer!r}, not in LAYERS")

    def cycle_from(m: str, path: list[str]) -> list[str] | None:
        for n in sorted(same_layer.get(m, ())):
            if n in path:
                return [*path[path.index(n):], n]
            found = cycle_from(n, [*path, n])
            if found:
                return found
        return None

    for m in sorted(same_layer):
        cycle = cycle_from(m, [m])
        if cycle:
            out.append("SAME_LAYER has a cycle: " + " -> ".join(cycle))
            break
    return out


# --------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------


def test_rule_tables_are_consistent():
    assert table_problems(LAYERS, SAME_LAYER, ONLY) == []


def test_every_module_is_placed_in_a_layer():
    missing = unplaced_modules(PACKAGE_DIR, LAYERS)
    assert not missing, f"place these {PACKAGE} modules in LAYERS (tests/test_layering.py): {missing}"


def test_no_module_imports_a_higher_layer():
    found = layering_violations(PACKAGE_DIR, PACKAGE, LAYERS, SAME_LAYER, ONLY)
    assert not found, "layering violations:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------
# The checker on a synthetic package
# --------------------------------------------------------------------------------------

TOY_LAYERS = {"low": ("__init__", "a", "a2"), "mid": ("m",), "high": ("b",)}
TOY_SAME = {"a2": {"a"}}
TOY_ONLY = {"m": {"__init__", "a"}}


def _toy(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "toy"
    pkg.mkdir()
    for name, body in {"__init__": "", "a": "", "a2": "", "m": "", "b": "", **files}.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(body))
    return pkg


def _check(pkg: Path) -> list[str]:
    return layering_violations(pkg, "toy", TOY_LAYERS, TOY_SAME, TOY_ONLY)


def test_checker_passes_a_clean_package(tmp_path):
    pkg = _toy(tmp_path, {
        "a2": "from toy import a\n",
        "m": "import toy.a\nfrom toy import __version__\n",
        "b": "from toy import a, m\nfrom toy.a2 import f\nfrom . import a2\n"
             "import importlib\nimportlib.import_module('toy.m')\n",
    })
    assert _check(pkg) == []
    assert unplaced_modules(pkg, TOY_LAYERS) == []


def test_checker_reports_every_form_of_an_upward_import(tmp_path):
    pkg = _toy(tmp_path, {"a": """\
        import os
        import toy.b
        from toy import b
        from toy.b import thing
        from . import b as bb
        from .b import other


        def later():
            from toy import m, a2
            import importlib
            return importlib.import_module("toy.b")
        """})
    found = _check(pkg)
    expected_lines = [2, 3, 4, 5, 6, 10, 10, 12]
    assert [int(v.split(":")[1]) for v in found] == expected_lines, found
    assert all(v.startswith("toy/a.py:") and "a [low] imports" in v for v in found)
    assert sum("imports b [high]: a higher layer" in v for v in found) == 6
    assert any("imports m [mid]: a higher layer" in v for v in found)
    assert any("imports a2 [low]: same layer, not allowed by SAME_LAYER['a']" in v for v in found)


def test_checker_applies_same_layer_and_only_rules(tmp_path):
    pkg = _toy(tmp_path, {
        "a": "from toy import a2\n",  # a2 may import a, not the reverse
        "m": "from toy import a2\n",  # lower layer, but m may import only __init__ and a
    })
    found = _check(pkg)
    assert found == [
        "toy/a.py:1: a [low] imports a2 [low]: same layer, not allowed by SAME_LAYER['a']",
        "toy/m.py:1: m [mid] imports a2 [low]: not among the modules ONLY['m'] allows",
    ]


def test_checker_reports_unplaced_modules_and_imports_of_them(tmp_path):
    pkg = _toy(tmp_path, {"extra": "", "a": "from toy.extra import x\n"})
    assert unplaced_modules(pkg, TOY_LAYERS) == ["extra"]
    assert _check(pkg) == ["toy/a.py:1: a [low] imports extra, which is not placed in LAYERS"]


def test_table_problems_catch_duplicates_cross_layer_entries_and_cycles():
    layers = {"x": ("p", "q"), "y": ("r", "p")}
    problems = table_problems(layers, {"p": {"q"}, "q": {"p"}, "r": {"q"}}, {"s": {"t"}})
    assert "p is in layer 'x' and in layer 'y'" in problems
    assert "SAME_LAYER['r'] lists 'q', not a module of its layer" in problems
    assert "ONLY has 's', not in LAYERS" in problems
    assert "ONLY['s'] lists 't', not in LAYERS" in problems
    assert any(p.startswith("SAME_LAYER has a cycle: ") for p in problems)
