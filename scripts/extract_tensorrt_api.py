"""Extract the TensorRT Python API from TensorRT's own binding sources into ``tests/deploy/tensorrt_api.json``.

    python scripts/extract_tensorrt_api.py GIT_DIR [--ref v10.12.0 --ref v11.0 ...] [--out FILE]

``GIT_DIR`` is a clone of https://github.com/NVIDIA/TensorRT (a bare mirror is fine: files are read with
``git show REF:PATH``). Run by hand when a TensorRT version is added; the conformance test
(``tests/deploy/test_tensorrt_api.py``) reads the checked-in result and needs no sources.

What is read, per ref: the pybind11 bindings (``python/src/**/*.cpp``: ``py::class_``/``py::enum_`` with their
``.def``/``.def_property*``/``.def_readwrite``/``.value`` chains, ``m.attr``/``m.def``) and the Python side of the
package (``python/packaging/bindings_wheel/tensorrt/__init__.py``: ``__version__``, helper functions, attributes it
adds to classes). What is recorded: module names with their kind; per class its bases and members, a member being
``"property"``, ``"readonly"``, ``"value"`` (an enum value), ``"attr"``, ``"class"`` (a nested class or enum) or the
list of a method's overloads, each the list of its named parameters (``"flags="``: with a default; ``null``: pybind
names none, so only positional calls work).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY = "https://github.com/NVIDIA/TensorRT"
DEFAULT_REFS = ("v10.12.0", "v10.13.0", "v10.16", "v11.0", "v11.1")
BINDINGS = "python/src"
HEADERS = "include"
PACKAGE_INIT = "python/packaging/bindings_wheel/tensorrt/__init__.py"
CLASSES = ("Builder", "BuilderFlag", "DataType", "EngineInspector", "IBuilderConfig", "ICudaEngine",
           "IExecutionContext", "IHostMemory", "ILogger", "ILogger.Severity", "INetworkDefinition",
           "IOptimizationProfile", "ITensor", "ITimingCache", "LayerInformationFormat", "Logger", "MemoryPoolType",
           "NetworkDefinitionCreationFlag", "OnnxParser", "ParserError", "ProfilingVerbosity", "Runtime",
           "TensorIOMode")
"""The classes whose members are recorded (every module name is): those mpexport and its test stand-in use. Add one
here, and extract again, when mpexport starts using another class."""
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "deploy" / "tensorrt_api.json"
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_CHAIN = re.compile(r"\s*\.\s*(def\w*|value|export_values)\s*\(")
_BINDER = re.compile(r"py::(class_|enum_)\s*<")
_VAR_CALL = re.compile(r"(?:^|(?<=[;{}]))\s*(\w+)\s*\.\s*(def\w*|value|export_values|attr)\s*\(")
_NAMED = re.compile(r'^\s*(?:"(\w+)"_a|py::arg\(\s*"(\w+)"\s*\))\s*(=)?')
_ENUM = re.compile(r"\benum\s+class\s+(\w+)\s*:\s*\w+\s*\{(.*?)\}", re.S)
_ENUMERATOR = re.compile(r"^\s*(k\w+)(?:\s+TRT_DEPRECATED_ENUM)?\s*(?:=\s*(.+?))?\s*$", re.S)
_PROPERTY_KINDS = {"def_property": "property", "def_property_readonly": "readonly", "def_readwrite": "property",
                   "def_readonly": "readonly", "def_property_static": "property",
                   "def_property_readonly_static": "readonly"}


@dataclass
class ClassApi:
    """One bound class or enum: its C++ type, bases (C++ types until resolved), and members."""

    cpp: str
    bases: list[str]
    members: dict[str, Any] = field(default_factory=dict)

    def add_method(self, name: str, params: list[str] | None) -> None:
        """Another overload of method ``name``."""
        overloads = self.members.setdefault(name, [])
        if isinstance(overloads, list) and params not in overloads:
            overloads.append(params)


@dataclass
class Api:
    """What one ref binds: module names and classes (Python name, ``Outer.Inner`` for nested ones)."""

    module: dict[str, str] = field(default_factory=dict)
    classes: dict[str, ClassApi] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    """C++ variable -> Python class name, for bindings continued in later statements."""
    enum_values: dict[tuple[str, str], int] = field(default_factory=dict)
    """(C++ enum, enumerator) -> its value, from the headers: ``("DataType", "kHALF") -> 1``."""

    def to_json(self, wanted: tuple[str, ...] = CLASSES) -> dict[str, Any]:
        """Sorted, with bases resolved to Python class names; members of the ``wanted`` classes (and their bases)."""
        by_cpp = {api.cpp: name for name, api in self.classes.items()}
        classes = {}
        for name in sorted(self._with_bases(wanted, by_cpp)):
            api = self.classes[name]
            bases = [by_cpp[base] for base in api.bases if base in by_cpp and by_cpp[base] != name]
            classes[name] = {"bases": bases, "members": dict(sorted(api.members.items()))}
        return {"module": dict(sorted(self.module.items())), "classes": classes}

    def _with_bases(self, wanted: tuple[str, ...], by_cpp: dict[str, str]) -> set[str]:
        names, todo = set(), [name for name in wanted if name in self.classes]
        while todo:
            name = todo.pop()
            names.add(name)
            todo.extend(by_cpp[base] for base in self.classes[name].bases if by_cpp.get(base) not in (None, *names))
        return names


def _matching(text: str, start: int, opening: str, closing: str) -> int:
    """Index just past the bracket closing the one at ``start`` (strings skipped)."""
    depth, index = 0, start
    while index < len(text):
        char = text[index]
        if char == '"':
            index = _STRING.match(text, index).end()  # type: ignore[union-attr]
            continue
        if char == "'":
            index = text.index("'", index + 2 if text[index + 1] == "\\" else index + 1) + 1
            continue
        if char in opening:
            depth += 1
        elif char in closing:
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise ValueError(f"unbalanced {opening} at {start}")


def _template_end(text: str, start: int) -> int:
    """Index just past the ``>`` closing the template argument list opened at ``start``."""
    depth, index = 0, start
    while True:
        depth += {"<": 1, ">": -1}.get(text[index], 0)
        index += 1
        if depth == 0:
            return index


def _split_args(inner: str) -> list[str]:
    """Top-level comma-separated arguments of a call's inside."""
    args, depth, current, index = [], 0, [], 0
    while index < len(inner):
        char = inner[index]
        if char == '"':
            end = _STRING.match(inner, index).end()  # type: ignore[union-attr]
            current.append(inner[index:end])
            index = end
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            args.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    args.append("".join(current))
    return [arg.strip() for arg in args]


def _params(args: list[str]) -> list[str] | None:
    """The named parameters of a ``.def`` (``"x"_a`` or ``py::arg("x")``, ``=`` with a default)."""
    names = []
    for arg in args:
        match = _NAMED.match(arg)
        if match:
            names.append((match.group(1) or match.group(2)) + ("=" if match.group(3) else ""))
    return names or None


def _apply_chain(api: Api, owner: str, text: str, index: int, end: int) -> int:
    """Apply ``.def(...)``/``.value(...)`` calls from ``index`` up to ``end`` to class ``owner``."""
    exported = False
    while True:
        match = _CHAIN.match(text, index)
        if not match or match.start() >= end:
            break
        call_end = _matching(text, match.end() - 1, "([{", ")]}")
        args = _split_args(text[match.end():call_end - 1])
        _apply_call(api, owner, match.group(1), args)
        exported |= match.group(1) == "export_values"
        index = call_end
    if exported:
        _export_values(api, owner)
    return index


def _apply_call(api: Api, owner: str, method: str, args: list[str]) -> None:
    members = api.classes[owner]
    name = args[0][1:-1] if args and args[0].startswith('"') else None
    if method == "def" and args and args[0].startswith("py::init"):
        members.add_method("__init__", _params(args[1:]))
    elif method in ("def", "def_static") and name:
        members.add_method(name, _params(args[1:]))
    elif method in _PROPERTY_KINDS and name:
        members.members[name] = _PROPERTY_KINDS[method]
    elif method == "value" and name:
        members.members[name] = _enum_value(api, args[1] if len(args) > 1 else "")


def _enum_value(api: Api, enumerator: str) -> int | str:
    """The integer a ``.value("X", Enum::kX)`` binds (from the headers), else ``"value"``."""
    parts = re.findall(r"\w+", enumerator)
    value = api.enum_values.get((parts[-2], parts[-1])) if len(parts) >= 2 else None
    return "value" if value is None else value


def _export_values(api: Api, owner: str) -> None:
    """``.export_values()``: an enum's values become attributes of the scope it was bound in."""
    if "." in owner:
        outer = owner.rsplit(".", 1)[0]
        for value, kind in api.classes[owner].members.items():
            if not isinstance(kind, (list, str)) or kind == "value":
                api.classes[outer].members[value] = kind


def _bind(api: Api, text: str, match: re.Match[str]) -> None:
    """One ``py::class_<...>``/``py::enum_<...>`` statement: its name, scope, bases and chained members."""
    template_end = _template_end(text, match.end() - 1)
    cpp_types = _split_args(text[match.end():template_end - 1])
    rest = re.compile(r"\s*(\w+)?\s*([({])").match(text, template_end)
    if rest is None:
        return
    variable = rest.group(1)
    close = "}" if rest.group(2) == "{" else ")"
    args_end = _matching(text, rest.end() - 1, "([{", ")]}")
    args = _split_args(text[rest.end():args_end - 1])
    if len(args) < 2 or not args[1].startswith('"') or close not in text[args_end - 1]:
        return
    scope, name = args[0], args[1][1:-1]
    if scope != "m":
        outer = api.variables.get(scope)
        if outer is None:
            return
        api.classes[outer].members[name] = "class"
        name = f"{outer}.{name}"
    else:
        api.module[name] = "enum" if match.group(1) == "enum_" else "class"
    api.classes.setdefault(name, ClassApi(cpp_types[0], cpp_types[1:]))
    assigned = re.search(r"(\w+)\s*=\s*$", text[max(0, match.start() - 80):match.start()])
    for var in (variable, assigned.group(1) if assigned else None):
        if var:
            api.variables[var] = name
    _apply_chain(api, name, text, args_end, len(text))


def read_enums(api: Api, header: str) -> None:
    """The values of the ``enum class`` enumerators a header declares (plain integers; others left out)."""
    for match in _ENUM.finditer(_COMMENTS.sub(" ", header)):
        value = -1
        for item in match.group(2).split(","):
            parsed = _ENUMERATOR.match(item)
            if not parsed:
                continue
            text = parsed.group(2)
            try:
                value = int(text, 0) if text else value + 1
            except ValueError:
                shift = re.fullmatch(r"\(?\s*1U?\s*<<\s*(\d+)\s*\)?", text or "")
                if not shift:
                    continue
                value = 1 << int(shift.group(1))
            api.enum_values[(match.group(1), parsed.group(1))] = value


def read_bindings(api: Api, source: str) -> None:
    """Add what one binding source file binds."""
    text = _COMMENTS.sub(" ", source)
    for match in _BINDER.finditer(text):
        _bind(api, text, match)
    for match in _VAR_CALL.finditer(text):
        variable, method = match.group(1), match.group(2)
        start = match.end() - 1
        call_end = _matching(text, start, "([{", ")]}")
        args = _split_args(text[start + 1:call_end - 1])
        name = args[0][1:-1] if args and args[0].startswith('"') else None
        if variable == "m" and name:
            api.module[name] = "function" if method == "def" else "attr"
        elif variable in api.variables:
            owner = api.variables[variable]
            _apply_call(api, owner, method, args)
            _apply_chain(api, owner, text, call_end, len(text))


def read_package_init(api: Api, source: str) -> None:
    """Add what the package's ``__init__.py`` defines (its CMake placeholders ``##NAME##`` read as ``NAME``)."""
    tree = ast.parse(re.sub(r"##(\w+)##", r"\1", source))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            api.module[node.name] = "function"
    for node in ast.walk(tree):  # module level and inside its ``if`` blocks (functions assign nothing global)
        for target in node.targets if isinstance(node, ast.Assign) else []:
            if isinstance(target, ast.Name) and node in tree.body:
                api.module[target.id] = "attr"
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                    and target.value.id in api.classes:
                api.classes[target.value.id].members.setdefault(target.attr, "attr")


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True,
                          text=True).stdout


def extract(git_dir: Path, ref: str) -> dict[str, Any]:
    """The API bound at ``ref``, with the commit and the files it was read from."""
    commit = _git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
    files = sorted(path for path in _git(git_dir, "ls-tree", "-r", "--name-only", commit, BINDINGS).split()
                   if path.endswith(".cpp"))
    headers = sorted(path for path in _git(git_dir, "ls-tree", "-r", "--name-only", commit, HEADERS).split()
                     if path.endswith(".h"))
    api = Api()
    for path in headers:
        read_enums(api, _git(git_dir, "show", f"{commit}:{path}"))
    for path in files:
        read_bindings(api, _git(git_dir, "show", f"{commit}:{path}"))
    read_package_init(api, _git(git_dir, "show", f"{commit}:{PACKAGE_INIT}"))
    return {"ref": ref, "commit": commit, "files": [*files, PACKAGE_INIT, *headers], **api.to_json()}


def version_key(ref: str) -> str:
    """``v10.12.0`` -> ``10.12``."""
    major, minor = re.findall(r"\d+", ref)[:2]
    return f"{major}.{minor}"


def dump(data: dict[str, Any]) -> str:
    """JSON with one line per class, so the checked-in file stays readable and diffs stay small."""
    lines = ["{"]
    for key in ("repository", "extracted_by", "note"):
        lines.append(f"  {json.dumps(key)}: {json.dumps(data[key])},")
    lines.append('  "versions": {')
    versions = list(data["versions"].items())
    for number, (version, api) in enumerate(versions):
        lines.append(f"    {json.dumps(version)}: {{")
        for key in ("ref", "commit", "files", "module"):
            lines.append(f"      {json.dumps(key)}: {json.dumps(api[key])},")
        lines.append('      "classes": {')
        classes = list(api["classes"].items())
        for index, (name, entry) in enumerate(classes):
            comma = "," if index < len(classes) - 1 else ""
            lines.append(f"        {json.dumps(name)}: {json.dumps(entry)}{comma}")
        lines.append("      }")
        lines.append("    }" + ("," if number < len(versions) - 1 else ""))
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("git_dir", type=Path, help="A clone (or bare mirror) of NVIDIA/TensorRT.")
    parser.add_argument("--ref", action="append", help=f"Tags or branches to read (default: {' '.join(DEFAULT_REFS)}).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Where to write the JSON.")
    args = parser.parse_args()
    git_dir = args.git_dir / ".git" if (args.git_dir / ".git").exists() else args.git_dir
    data = {"repository": REPOSITORY, "extracted_by": "scripts/extract_tensorrt_api.py",
            "note": "TensorRT's Python API as its binding sources declare it; regenerate with the script above",
            "versions": {version_key(ref): extract(git_dir, ref) for ref in args.ref or DEFAULT_REFS}}
    args.out.write_text(dump(data))
    for version, api in data["versions"].items():
        print(f"{version}: {api['ref']} {api['commit'][:12]}: {len(api['module'])} module names, "
              f"{len(api['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
