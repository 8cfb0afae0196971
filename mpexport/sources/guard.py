"""While torch reads a ``torch.export`` archive, every route by which the file could run code raises instead
(:func:`no_code_from_file`), and the check of the symbolic-shape strings torch hands to ``sympy.sympify``
(:func:`unsafe_expression`).

The routes, read in ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py`` (torch 2.13):
``torch.load(..., weights_only=False)`` for weights and constants marked ``use_pickle`` and as the fallback of
``deserialize_torch_artifact`` (sample inputs, legacy weight files, the pre-archive format); ``pickle.loads`` for
opaque constants; ``torch._C._pickle_load_obj`` for torchbind objects; ``_load_aoti`` (a native library from the
archive); ``sympy.sympify`` on each ``expr_str`` (it evaluates Python).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import pickle
import re
from collections.abc import Iterator
from typing import Any

SYMBOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
ALLOWED_NODES = (ast.Expression, ast.Call, ast.keyword, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp,
                 ast.BoolOp, ast.Compare, ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.Tuple)


class UntrustedCode(Exception):  # not a RuntimeError: torch.export.load swallows those
    """Raised inside torch's loader where the file would have run code; the guard records why."""


def unsafe_expression(text: str) -> bool:
    """True unless ``text`` is a plain sympy expression as torch writes them (``Symbol('s0', positive=True)``,
    ``FloorDiv(Symbol('s0'), Integer(2))``, ``2*s0 + 1``): calls of sympy's and torch's expression classes only,
    names of symbols and sympy constants, numbers, identifier-like strings, arithmetic and comparisons. Anything
    else (attributes, subscripts, lambdas, other callables, other strings) would be evaluated by ``sympify``."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True
    names = expression_names()
    for node in ast.walk(tree):
        if not isinstance(node, ALLOWED_NODES):
            return True
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in names):
            return True
        if isinstance(node, ast.Name) and node.id not in names and not re.fullmatch(r"[a-z]+[0-9]+", node.id):
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not SYMBOL_NAME.fullmatch(node.value):
            return True
        if isinstance(node, ast.Constant) and not isinstance(node.value, (str, int, float, bool, type(None))):
            return True
    return False


@functools.cache
def expression_names() -> frozenset[str]:
    """Names an expression may use: sympy's expression classes and constants (subclasses and instances of
    ``sympy.Basic``) and torch's sympy functions and numbers."""
    import sympy  # type: ignore[import-untyped]
    from torch.utils._sympy import functions, numbers

    names = set()
    for module in (sympy, functions, numbers):
        for name, value in vars(module).items():
            basic = isinstance(value, sympy.Basic) or (isinstance(value, type) and issubclass(value, sympy.Basic))
            if basic and not name.startswith("_"):
                names.add(name)
    return frozenset(names)


class _GuardedPickle:
    """``pickle`` as torch's archive loader sees it under the guard: ``loads`` refuses."""

    def __init__(self, refuse: Any) -> None:
        self._refuse = refuse

    def loads(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("an opaque constant (pickle.loads)")

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


class _GuardedSympy:
    """``sympy`` as torch's deserializer sees it under the guard: ``sympify`` takes plain expressions only."""

    def __init__(self, refuse: Any) -> None:
        import sympy

        self._sympy = sympy
        self._refuse = refuse

    def sympify(self, value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and unsafe_expression(value):
            self._refuse(f"a symbolic shape that is Python code ({value[:60]!r})")
        return self._sympy.sympify(value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sympy, name)


@contextlib.contextmanager
def no_code_from_file(trusted: bool) -> Iterator[list[str]]:
    """While open (unless ``trusted``), full-trust unpickling, torchbind objects, AOTInductor libraries and
    ``sympify`` of anything but a plain expression raise :class:`UntrustedCode` in torch's archive loader; the
    list yielded collects what was refused (torch logs and swallows some errors: check the list afterwards).
    ``torch.load`` is replaced process-wide while open (a weights-only load still works); everything is restored
    on exit."""
    refused: list[str] = []
    if trusted:
        yield refused
        return
    import torch
    from torch._export.serde import serialize
    from torch.export.pt2_archive import _package

    def refuse(what: str) -> None:
        refused.append(what)
        raise UntrustedCode(what)

    original_load = torch.load

    def guarded_load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: bool | None = None,
                     **kwargs: Any) -> Any:
        if weights_only is False or pickle_module is not None:
            refuse("a payload torch unpickles with full trust (torch.load(weights_only=False))")
        return original_load(f, map_location, weights_only=True, **kwargs)

    def guarded_object(*args: Any, **kwargs: Any) -> Any:
        refuse("a torchbind custom object (torch._C._pickle_load_obj)")

    def guarded_aoti(*args: Any, **kwargs: Any) -> Any:
        refuse("AOTInductor compiled code (a native library)")

    saved = [(torch, "load", original_load), (torch._C, "_pickle_load_obj", torch._C._pickle_load_obj),
             (_package, "pickle", _package.pickle), (_package, "_load_aoti", _package._load_aoti),
             (serialize, "sympy", serialize.sympy)]
    replacements = [guarded_load, guarded_object, _GuardedPickle(refuse), guarded_aoti, _GuardedSympy(refuse)]
    try:
        for (owner, name, _), replacement in zip(saved, replacements, strict=True):
            setattr(owner, name, replacement)
        yield refused
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
