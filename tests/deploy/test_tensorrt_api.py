"""Every part of TensorRT's Python API that mpexport uses exists, as used, in every supported TensorRT version; and the
test stand-in (``tests/stand_ins/tensorrt``) offers nothing those versions lack.

The API of each version is ``tests/deploy/tensorrt_api.json``, extracted from TensorRT's binding sources (the
repository, tag, commit and files are recorded in it) by ``scripts/extract_tensorrt_api.py``. mpexport's uses are
collected from ``mpexport/deploy/tensorrt.py`` and ``mpexport/backends/tensorrt.py`` with ``ast``: ``trt.X``,
``trt.X.Y``, and the attributes and methods of the TensorRT objects it holds, typed by a small explicit table of what
each TensorRT call returns (:data:`RETURNS`); calls are checked against the parameter names the bindings declare.
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mpexport.deploy.tensorrt import network_flags
from tests.helpers import REPO

API = json.loads((Path(__file__).with_name("tensorrt_api.json")).read_text())
VERSIONS = API["versions"]
SOURCES = (REPO / "mpexport" / "deploy" / "tensorrt.py", REPO / "mpexport" / "backends" / "tensorrt.py")
STAND_IN_VERSIONS = {"10.13.0": "10.13", "11.0.0": "11.0"}
MODULE_NAMES = {"trt", "tensorrt"}
"""Names that hold the ``tensorrt`` module in mpexport's code (imported, or passed to a helper)."""
PARAMETERS = {("_parser_errors", "parser"): "OnnxParser", ("_attach_timing_cache", "config"): "IBuilderConfig"}
"""Function parameters that hold a TensorRT object: (function, parameter) -> class."""
FUNCTIONS = {"_attach_timing_cache": "ITimingCache"}
"""mpexport's own functions that return a TensorRT object -> its class."""
RETURNS = {
    ("Builder", "create_network"): "INetworkDefinition", ("Builder", "create_builder_config"): "IBuilderConfig",
    ("Builder", "create_optimization_profile"): "IOptimizationProfile",
    ("Builder", "build_serialized_network"): "IHostMemory", ("INetworkDefinition", "get_input"): "ITensor",
    ("OnnxParser", "get_error"): "ParserError", ("IBuilderConfig", "create_timing_cache"): "ITimingCache",
    ("IBuilderConfig", "get_timing_cache"): "ITimingCache", ("ITimingCache", "serialize"): "IHostMemory",
    ("Runtime", "deserialize_cuda_engine"): "ICudaEngine",
    ("ICudaEngine", "create_execution_context"): "IExecutionContext",
    ("ICudaEngine", "create_engine_inspector"): "EngineInspector",
}
"""What the TensorRT methods mpexport calls return, where it is a TensorRT object; other calls give plain values (an
attribute taken from one fails the test, so a new use must be typed here first)."""
CLASS_NAMES = {name for api in VERSIONS.values()
               for name in (*api["classes"], *(n for n, kind in api["module"].items() if kind in ("class", "enum")))}
"""Every class or enum any extracted version binds (``ILogger.Severity`` for a nested one)."""
Type = tuple[str, str]
"""``("module", "")``, ``("class", name)``, ``("instance", name)``, or ``("plain", origin)``: a call's other result."""


@dataclass(frozen=True)
class Use:
    """One use: ``owner`` (``module``, or a class) and its attribute, how (``call``/``attr``/``set``/``exists``), with
    the number of positional arguments and the keywords of a call, and where."""

    owner: str
    name: str
    how: str
    where: str
    positional: int = 0
    keywords: tuple[str, ...] = ()


@dataclass
class Collector(ast.NodeVisitor):
    """The uses of TensorRT in one source file, typing each expression that holds a TensorRT object."""

    path: Path
    uses: list[Use] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)
    scopes: list[dict[str, Type]] = field(default_factory=lambda: [{}])
    selves: dict[str, Type] = field(default_factory=dict)
    constants: dict[str, str] = field(default_factory=dict)

    def where(self, node: ast.AST) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path.name
        return f"{path}:{getattr(node, 'lineno', 0)}"

    def visit_Module(self, node: ast.Module) -> None:
        for statement in node.body:  # module-level string constants (getattr(trt, NAME))
            if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant) \
                    and isinstance(statement.value.value, str):
                self.constants.update({t.id: statement.value.value for t in statement.targets
                                       if isinstance(t, ast.Name)})
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scopes.append({arg.arg: ("instance", PARAMETERS[(node.name, arg.arg)]) for arg in node.args.args
                            if (node.name, arg.arg) in PARAMETERS})
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases:
            self.type_of(base)
        saved, self.selves = self.selves, {}
        for statement in node.body:
            self.visit(statement)
        self.selves = saved

    def visit_Assign(self, node: ast.Assign) -> None:
        kind = self.type_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if kind:
                    self.scopes[-1][target.id] = kind
            elif _is_self(target):
                if kind:
                    self.selves[target.attr] = kind  # type: ignore[attr-defined]
            elif isinstance(target, ast.Attribute):
                self.attribute(target, self.type_of(target.value), target.attr, "set")
            else:
                self.type_of(target)

    def generic_visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.expr):
            self.type_of(node)
        else:
            super().generic_visit(node)

    def type_of(self, node: ast.expr) -> Type | None:
        """The TensorRT type of ``node`` (None: not a TensorRT object), recording every use inside it."""
        if isinstance(node, ast.Name):
            if node.id in MODULE_NAMES:
                return ("module", "")
            return next((scope[node.id] for scope in reversed(self.scopes) if node.id in scope), None)
        if isinstance(node, ast.Attribute):
            if _is_self(node) and node.attr in self.selves:
                return self.selves[node.attr]
            return self.attribute(node, self.type_of(node.value), node.attr, "attr")
        if isinstance(node, ast.Call):
            return self.call(node)
        types = [self.type_of(child) for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr)]
        for child in (child for child in ast.iter_child_nodes(node) if isinstance(child, ast.comprehension)):
            for part in (child.target, child.iter, *child.ifs):
                self.type_of(part)
        return next((kind for kind in types if kind), None) if isinstance(node, ast.IfExp) else None

    def attribute(self, node: ast.AST, owner: Type | None, name: str, how: str,
                  call: ast.Call | None = None) -> Type | None:
        """Record ``owner.name``; the type of the result when it is a class."""
        if owner is None or (owner[0] == "instance" and name.startswith("__") and how == "attr"):
            return None
        if owner[0] == "plain":
            self.unknown.append(f"{self.where(node)}: .{name} of what {owner[1]} returns (add it to RETURNS)")
            return None
        target = "module" if owner[0] == "module" else owner[1]
        keywords = tuple(keyword.arg or "**" for keyword in call.keywords) if call else ()
        self.uses.append(Use(target, name, how, self.where(node), len(call.args) if call else 0, keywords))
        nested = name if owner[0] == "module" else f"{owner[1]}.{name}"
        return ("class", nested) if owner[0] in ("module", "class") and nested in CLASS_NAMES else None

    def call(self, node: ast.Call) -> Type | None:
        for argument in [*node.args, *(keyword.value for keyword in node.keywords)]:
            self.type_of(argument)
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            owner, name = self.type_of(node.args[0]), node.args[1]
            text = name.value if isinstance(name, ast.Constant) else \
                self.constants.get(name.id) if isinstance(name, ast.Name) else None
            if owner and isinstance(text, str):
                self.attribute(node, owner, text, "exists")
            elif owner:
                self.dynamic.append(f"{self.where(node)}: {func.id}({ast.unparse(node.args[0])}, ...)")
            return None
        if isinstance(func, ast.Name):
            return ("instance", FUNCTIONS[func.id]) if func.id in FUNCTIONS else None
        if not isinstance(func, ast.Attribute):
            self.type_of(func)
            return None
        owner = self.type_of(func.value)
        if owner is None or owner[0] == "plain":
            self.attribute(func, owner, func.attr, "call")
            return None
        kind = self.attribute(node, owner, func.attr, "call", node)
        if owner[0] == "instance":
            returned = RETURNS.get((owner[1], func.attr))
            return ("instance", returned) if returned else ("plain", f"{owner[1]}.{func.attr}()")
        if kind:  # a class called: its constructor
            self.uses.append(Use(kind[1], "__init__", "call", self.where(node), len(node.args),
                                 tuple(keyword.arg or "**" for keyword in node.keywords)))
            return ("instance", kind[1])
        return None


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def collect(sources: tuple[Path, ...] = SOURCES) -> Collector:
    """mpexport's uses of TensorRT, from both files (the seam's own ``MPEXPORT_*`` names left out: only a stand-in
    declares them, and mpexport reads them with a default)."""
    total = Collector(REPO)
    for path in sources:
        collector = Collector(path)
        collector.visit(ast.parse(path.read_text()))
        total.uses += [use for use in collector.uses if not use.name.startswith("MPEXPORT_")]
        total.unknown += collector.unknown
        total.dynamic += collector.dynamic
    return total


def member(version: dict[str, Any], owner: str, name: str) -> Any:
    """What ``version`` binds as ``owner.name`` (through the bases; the module's names for ``module``), or None."""
    if owner == "module":
        return version["module"].get(name)
    todo = [owner]
    while todo:
        entry = version["classes"].get(todo.pop())
        if entry is None:
            continue
        if name in entry["members"]:
            return entry["members"][name]
        todo.extend(entry["bases"])
    return None


def problem(version: dict[str, Any], use: Use) -> str | None:
    """Why ``use`` does not fit ``version``'s bindings (None: it does)."""
    if use.owner != "module" and use.owner not in version["classes"]:
        return f"class {use.owner} is not among the extracted ones (add it to CLASSES in the script, extract again)"
    bound = member(version, use.owner, use.name)
    if bound is None:
        return "not bound"
    if use.how == "call" and use.owner != "module" and not isinstance(bound, list):
        return f"called, but bound as {bound}"
    if use.how == "set" and bound != "property":
        return f"assigned, but bound as {bound}"
    if use.how == "call" and isinstance(bound, list) and not any(_fits(params, use) for params in bound):
        return f"called with {use.positional} positional and {list(use.keywords)}, the bindings take {bound}"
    return None


def _fits(params: list[str] | None, use: Use) -> bool:
    if params is None:  # pybind names no parameter: positional only
        return not use.keywords
    names = [param.rstrip("=") for param in params]
    required = [param for param in params if not param.endswith("=")]
    given = set(names[:use.positional]) | set(use.keywords)
    return use.positional <= len(names) and set(use.keywords) <= set(names) \
        and {param for param in required} <= given


USES = collect()


def test_the_uses_are_collected() -> None:
    """The collector sees what mpexport does (a broken one would pass every version vacuously)."""
    seen = {(use.owner, use.name) for use in USES.uses}
    for expected in [("module", "Builder"), ("module", "__version__"), ("Builder", "create_network"),
                     ("OnnxParser", "parse_from_file"), ("ParserError", "node_name"), ("IBuilderConfig", "clear_flag"),
                     ("BuilderFlag", "TF32"), ("ITensor", "name"), ("IOptimizationProfile", "set_shape"),
                     ("ITimingCache", "serialize"), ("EngineInspector", "get_engine_information"),
                     ("ICudaEngine", "get_tensor_mode"), ("IExecutionContext", "execute_async_v3"),
                     ("IExecutionContext", "set_tensor_address"), ("ILogger", "WARNING"), ("module", "bool")]:
        assert expected in seen, expected
    assert USES.unknown == []
    assert [text.split(": ", 1)[1] for text in USES.dynamic] == ["getattr(trt.NetworkDefinitionCreationFlag, ...)"]


@pytest.mark.parametrize("version", list(VERSIONS), ids=[f"TensorRT-{v}-{VERSIONS[v]['ref']}" for v in VERSIONS])
def test_every_use_is_bound(version: str) -> None:
    api = VERSIONS[version]
    problems = sorted({f"{use.where}: {use.owner}.{use.name}: {why}" for use in USES.uses
                       if (why := problem(api, use))})
    assert problems == [], f"TensorRT {version} ({api['ref']}, {api['commit'][:12]})"
    flags = network_flags(f"{version}.0")  # the one attribute taken by name: getattr(NetworkDefinitionCreationFlag)
    assert all(member(api, "NetworkDefinitionCreationFlag", flag) is not None for flag in flags)


def test_the_versions_checked() -> None:
    """Both supported majors, from their first supported release to the newest extracted, with the facts the engine
    stage is built on (TensorRT 11: no FP16/BF16/INT8/FP8 builder flags, STRONGLY_TYPED deprecated and renumbered)."""
    assert API["repository"] == "https://github.com/NVIDIA/TensorRT"
    majors = {version.split(".")[0] for version in VERSIONS}
    assert majors == {"10", "11"} and "10.12" in VERSIONS
    for version, api in VERSIONS.items():
        assert len(api["commit"]) == 40 and api["files"]
        flags = api["classes"]["BuilderFlag"]["members"]
        strongly_typed = api["classes"]["NetworkDefinitionCreationFlag"]["members"]["STRONGLY_TYPED"]
        if version.startswith("11."):
            assert not {"FP16", "BF16", "INT8", "FP8"} & set(flags) and strongly_typed == 0
        else:
            assert {"FP16", "BF16", "INT8", "FP8"} <= set(flags) and strongly_typed == 1
        assert flags["TF32"] == 6
    print("checked TensorRT", ", ".join(f"{v} ({a['ref']} {a['commit'][:12]})" for v, a in VERSIONS.items()))


MISUSE = """
import tensorrt as trt

def build(path):
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    network = builder.create_network(flags=0, strongly_typed=True)
    network.num_inputs = 1
    engine = trt.Runtime(builder).deserialize_cuda_engine(path)
    return engine.num_io_tensors(), engine.get_tensor_shape("x").nbDims
"""


@pytest.mark.parametrize(("version", "expected"), [
    ("10.13", []), ("11.0", ["BuilderFlag.FP16: not bound"])])
def test_the_conformance_check_sees_what_tensorrt_lacks(version: str, expected: list[str], tmp_path: Path) -> None:
    """A use the version does not bind, a keyword it does not take, a readonly property set, a property called, and
    an attribute of an untyped result are all reported."""
    (tmp_path / "misuse.py").write_text(MISUSE)
    uses = collect((tmp_path / "misuse.py",))
    found = sorted(f"{use.owner}.{use.name}: {why}" for use in uses.uses if (why := problem(VERSIONS[version], use)))
    assert found == sorted([*expected, "Builder.create_network: called with 0 positional and ['flags', "
                            "'strongly_typed'], the bindings take [['flags=']]",
                            "INetworkDefinition.num_inputs: assigned, but bound as readonly",
                            "ICudaEngine.num_io_tensors: called, but bound as readonly"])
    assert uses.unknown == ["misuse.py:11: .nbDims of what ICudaEngine.get_tensor_shape() returns (add it to RETURNS)"]


# -- the stand-in is no more permissive than TensorRT ------------------------------------------------------------
def stand_in_problems(module: ModuleType, api: dict[str, Any]) -> list[str]:
    """What the stand-in module offers that ``api`` does not bind (or binds otherwise)."""
    problems = []
    for name, value in vars(module).items():
        if (name.startswith("_") and name != "__version__") or name.startswith("MPEXPORT_") or _imported(module, value):
            continue  # private helpers, the seam's own declarations, and what the stand-in imports
        if name not in api["module"]:
            problems.append(f"tensorrt.{name}")
        elif inspect.isclass(value):
            problems += _class_problems(value, name, api)
    return problems


def _imported(module: ModuleType, value: Any) -> bool:
    if isinstance(value, ModuleType) or type(value).__name__ == "_Feature":
        return True
    return not isinstance(value, str | int | float) and getattr(value, "__module__", module.__name__) != module.__name__


def _class_problems(cls: type, name: str, api: dict[str, Any]) -> list[str]:
    if name not in api["classes"]:
        return [f"{name}: its members are not extracted"]
    problems = []
    for attr, value in vars(cls).items():
        if (attr.startswith("_") and attr != "__init__") or (issubclass(cls, IntEnum) and attr not in cls.__members__):
            continue
        bound = member(api, name, attr)
        if attr == "__init__" and bound is None:
            continue  # not constructible from Python in TensorRT: mpexport never constructs it (the uses say)
        if bound is None:
            problems.append(f"{name}.{attr}")
        elif inspect.isclass(value) and issubclass(value, IntEnum) and bound in ("class", "attr"):
            problems += _class_problems(value, f"{name}.{attr}", api) if bound == "class" else []
        elif isinstance(value, IntEnum) or issubclass(cls, IntEnum):
            if bound != int(getattr(cls, attr)):
                problems.append(f"{name}.{attr} = {int(getattr(cls, attr))}, bound as {bound}")
        elif isinstance(value, property):
            if bound not in ("property", "readonly") or (value.fset is not None and bound == "readonly"):
                problems.append(f"{name}.{attr}: a {'settable ' if value.fset else ''}property, bound as {bound}")
        elif inspect.isfunction(value):
            if not isinstance(bound, list) or (_signature(value) not in bound and not _positional_only(value, bound)):
                problems.append(f"{name}.{attr}{inspect.signature(value)}, bound as {bound}")
    return problems


def _signature(function: Callable[..., Any]) -> list[str]:
    parameters = list(inspect.signature(function).parameters.values())[1:]
    return [p.name + ("=" if p.default is not inspect.Parameter.empty else "") for p in parameters]


def _positional_only(function: Callable[..., Any], bound: list[Any]) -> bool:
    """A method pybind names no parameter of takes no keyword: the stand-in's takes none either."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    return None in bound and all(p.kind == inspect.Parameter.POSITIONAL_ONLY for p in parameters)


@pytest.mark.parametrize("version", list(STAND_IN_VERSIONS))
def test_the_stand_in_offers_only_what_tensorrt_binds(version: str, stand_in_tensorrt) -> None:
    module = stand_in_tensorrt(version)
    assert module.__version__ == version
    assert stand_in_problems(module, VERSIONS[STAND_IN_VERSIONS[version]]) == []


def test_the_conformance_check_sees_a_permissive_stand_in(stand_in_tensorrt) -> None:
    module = stand_in_tensorrt("11.0.0")
    api = VERSIONS["11.0"]

    class BuilderFlag(IntEnum):
        TF32 = 6
        FP16 = 0  # gone in 11.0

    class Builder(module.Builder):  # type: ignore[name-defined, misc]
        def create_network(self, flags=0, strongly_typed=True):  # type: ignore[no-untyped-def]
            return super().create_network(flags)

    fake = ModuleType("tensorrt")
    fake.__dict__.update({"BuilderFlag": BuilderFlag, "Builder": Builder, "fp16_mode": True})
    BuilderFlag.__module__ = Builder.__module__ = "tensorrt"
    assert sorted(stand_in_problems(fake, api)) == [
        "Builder.create_network(self, flags=0, strongly_typed=True), bound as [['flags=']]",
        "BuilderFlag.FP16", "tensorrt.fp16_mode"]
