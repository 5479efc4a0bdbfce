"""The package's shape: small modules, short signatures, every choice set defined once.

Read with ``ast`` (no import of torch). The limits are the ones the layout keeps to; a change
that breaks one names the module, the function or the duplicated set.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from fmr1lib import choices

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fmr1lib"
MAX_LINES = 800
MAX_PARAMS = 8


def _modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE_DIR.glob("*.py"))}


def test_no_module_is_longer_than_the_limit():
    long = {p.name: n for p in PACKAGE_DIR.glob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def _n_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (names[:1] in (["self"], ["cls"]))


def test_no_function_takes_more_than_the_limit():
    wide = [f"{name}:{node.lineno} {node.name} ({_n_params(node)})"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _n_params(node) > MAX_PARAMS]
    assert not wide, f"functions over {MAX_PARAMS} parameters (pass a settings object): {wide}"


def _string_sets(tree: ast.Module) -> list[tuple[frozenset[str], int]]:
    """Every tuple, list or Literal subscript of two or more string constants, as a set."""
    out = []
    for node in ast.walk(tree):
        elts = None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elts = node.elts
        if elts and len(elts) >= 2 and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                           for e in elts):
            out.append((frozenset(e.value for e in elts), node.lineno))
    return out


def test_every_choice_set_is_spelled_once():
    """No module but ``choices`` spells a choice set's values out (a subset of two or more, as
    a tuple or list of strings, counts too: it is a copy that can fall out of step)."""
    sets = {name: frozenset(choices.options(value)) for name, value in vars(choices).items()
            if typing.get_origin(value) is typing.Literal}
    assert len(sets) >= 20, sorted(sets)
    copies = [f"{module}:{line} spells {name}"
              for module, tree in _modules().items() if module != "choices.py"
              for values, line in _string_sets(tree)
              for name, full in sets.items() if values == full]
    assert not copies, copies


def test_the_checks_above_see_what_they_look_for(tmp_path):
    """The parsers find a planted copy and a planted wide function."""
    tree = ast.parse('X = ("token_mean", "seq_mean")\ndef f(a, b, c, d, e, f, g, h, i): pass\n')
    assert (frozenset(choices.options(choices.LossAgg)), 1) in _string_sets(tree)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert _n_params(fn) == 9
    method = ast.parse("class C:\n    def m(self, a): pass\n").body[0].body[0]
    assert _n_params(method) == 1
