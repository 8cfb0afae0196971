"""Verify's backends, registered in one place: :data:`BACKENDS` lists each with how it is built, whether the gate
judges it, when a verdict requires it, and when it may be skipped. Adding a backend is one entry here (and its
builder); gating, the closed list of allowed skips and the order of the report all follow from the table.

A builder takes the :class:`Build` context and returns a runner, or raises :class:`~mpexport.check.backends.Skip`
with a reason the entry allows. Any other failure to build is recorded as ``failed`` (a backend that cannot be
checked never passes silently), except an error ``skip_on_error`` turns into an allowed skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mpexport.backends.base import Runner
from mpexport.backends.onnxruntime import OrtRunner, mapped_weights
from mpexport.base.errors import MpexportError
from mpexport.base.specs import Batch
from mpexport.bundle.names import ENGINE, FP32_ONNX
from mpexport.bundle.store import Bundle
from mpexport.capture.provenance import read_provenance
from mpexport.check.amp import TorchAmpRunner
from mpexport.check.backends import AMP, ONNX_AMP, ONNX_FP32, Skip
from mpexport.graph.emulate import load_strict_emulation, strict_emulation
from mpexport.sources.model import LoadedModel

ALWAYS, WITH_MODEL, NEVER = "always", "with a PyTorch model", "never"
NO_MODEL = "no PyTorch model (an ONNX input; verify --reference adds it)"


@dataclass
class Build:
    """What a builder may use: the bundle, the source model (None for an ONNX input), the input names and a first
    batch, the plan's policy, low type and plan, the mixed model verified, and the large-model settings."""

    bundle: Bundle
    loaded: LoadedModel | None
    names: list[str]
    example: Batch
    policy: str
    low: str
    plan: Any
    mixed: Path
    replacing: bool
    """True when ``mixed`` is a candidate replacing the bundle's model (repair): the bundle's engine is stale."""
    low_memory: bool
    reference: Runner
    low_weights: dict[str, np.ndarray]


@dataclass(frozen=True)
class Backend:
    """One verify backend. ``name`` may hold ``{low}`` (the plan's low type). ``model``: True runs it only with a
    PyTorch model, False only without one, None always. ``gated``: the gate judges its outputs. ``required``: when a
    verdict needs it to have run (:data:`ALWAYS`, :data:`WITH_MODEL`, :data:`NEVER`). ``may_skip``: when it may be
    skipped, in words (None: never; it then fails when it cannot run). ``skip_on_error`` turns a build error into
    an allowed skip reason (or None: the backend failed)."""

    name: str
    build: Callable[[Build], Runner]
    model: bool | None = None
    gated: bool = False
    required: str = NEVER
    may_skip: str | None = None
    skip_on_error: Callable[[str], str | None] | None = None
    mode: Callable[[Build], str] | None = None
    """How it ran, in words, where its runner does not say (a runner's own ``mode`` attribute)."""

    def named(self, low: str) -> str:
        """The backend's name for a plan whose low type is ``low``."""
        return self.name.format(low=low)


def _torch_amp(build: Build) -> Runner:
    """``torch-amp``: the source model under the training policy (the noise floor)."""
    assert build.loaded is not None
    return TorchAmpRunner(build.loaded, build.names, build.policy, build.example)


def _torch_cuda(build: Build) -> Runner:
    """``torch-cuda``: the model under real CUDA autocast where a GPU exists (the training numerics themselves)."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU visible to torch")
    if build.policy.startswith("cuda"):
        raise Skip("torch-amp already runs the model under real CUDA autocast")
    assert build.loaded is not None
    return TorchAmpRunner(build.loaded, build.names, f"cuda-{build.low}", build.example, name="torch-cuda")


def _onnx_fp32(build: Build) -> Runner:
    """``onnx-fp32``: the FP32 ONNX in ONNX Runtime, on the PyTorch model's parameters in place where it can."""
    path = build.bundle.path(FP32_ONNX)
    shared = shared_parameters(getattr(build.reference, "model", None), path)
    return OrtRunner(path, name=ONNX_FP32, shared_weights=shared)


def _onnx_amp(build: Build) -> Runner:
    """``onnx-amp``, the noise floor without PyTorch: the plan of the training policy alone (no deployment overrides,
    no range rule) in the training's low type, applied to the FP32 ONNX and emulated strictly. It stands for what
    training computed, as closely as the plan reproduces autocast (node by node, tested against real autocast)."""
    bundle, plan = build.bundle, build.plan
    model = ir.load(str(bundle.path(FP32_ONNX)))
    return training_emulation(model, bundle.path(FP32_ONNX).parent, read_provenance(bundle), plan.policy.name,
                              plan.policy.torch_version)


def training_emulation(model: ir.Model, base_dir: Path, records: list[Any], policy: str,
                       torch_version: str | None = None) -> Runner:
    """``onnx-amp`` for an FP32 ONNX ``model`` (changed in place) whose node provenance is ``records``: the plan of
    the training ``policy`` alone, in its own low type, applied and emulated strictly (external weights under
    ``base_dir``)."""
    from mpexport.graph.rewrite import apply_plan
    from mpexport.precision.options import Overrides, PlanOptions
    from mpexport.precision.planner import make_plan

    options = PlanOptions(policy=policy, target=None, torch_version=torch_version,
                          overrides=Overrides(), range_check=False)
    training = make_plan(model, records, options)
    try:
        apply_plan(model, training.precisions())
    except MpexportError as exc:  # a plan of this very model: a failure is this backend's, recorded as failed
        raise RuntimeError(exc.message) from None
    return OrtRunner.from_model(strict_emulation(model), base_dir, name=ONNX_AMP)


def _onnx_amp_mode(build: Build) -> str:
    return f"the {build.policy} plan in {build.policy.split('-')[1].upper()}, emulated strictly on the FP32 ONNX " \
        "(no PyTorch model)"


def _onnx_mixed(build: Build) -> Runner:
    """``onnx-mixed``: the mixed model in ONNX Runtime as it is deployed."""
    return OrtRunner(build.mixed, name="onnx-mixed", low_memory=build.low_memory, shared_weights=build.low_weights)


def _strict(build: Build) -> Runner:
    """``strict-<low>``: the mixed model with every low-precision value stored as the low type really stores it."""
    return OrtRunner.from_model(load_strict_emulation(build.mixed), build.mixed.parent, name=f"strict-{build.low}",
                                low_memory=build.low_memory, shared_weights=build.low_weights)


def _tensorrt(build: Build) -> Runner:
    """``tensorrt``: the engine, where the bundle has one and this machine can run it."""
    bundle = build.bundle
    if not bundle.has(ENGINE):
        raise Skip(bundle.manifest.skip_reason("engine") or "no engine in this bundle")
    if build.replacing:
        raise Skip("the bundle's engine was built from the model this one replaces")
    from mpexport.backends.tensorrt import TensorRTRunner
    from mpexport.deploy.tensorrt import tensorrt_status

    status = tensorrt_status()
    if not status.available:
        raise Skip(f"the bundle has an engine, but it cannot run here: {status.why}")
    return TensorRTRunner(bundle.path(ENGINE))


def _missing_kernel(error: str) -> str | None:
    if "NOT_IMPLEMENTED" in error:
        return f"this ONNX Runtime build has no CPU kernel for a type the model uses: {error}"
    return None


BACKENDS = (
    Backend(AMP, _torch_amp, model=True,
            may_skip="no PyTorch model (an ONNX input without --reference): onnx-amp is the noise floor"),
    Backend("torch-cuda", _torch_cuda, model=True,
            may_skip="no CUDA GPU visible to torch, or the policy is a CUDA one (torch-amp then runs it), or no "
            "PyTorch model"),
    Backend(ONNX_FP32, _onnx_fp32, model=True, gated=True, required=WITH_MODEL),
    Backend(ONNX_AMP, _onnx_amp, model=False, mode=_onnx_amp_mode),
    Backend("onnx-mixed", _onnx_mixed, gated=True, skip_on_error=_missing_kernel,
            may_skip="this ONNX Runtime build has no CPU kernel for the low type (BF16 Conv, for one); the strict "
            "emulation still checks the mixed model"),
    Backend("strict-{low}", _strict, gated=True, required=ALWAYS),
    Backend("tensorrt", _tensorrt, gated=True, may_skip="no engine in the bundle, or no TensorRT or GPU here"),
)
"""Every backend verify runs after the reference (the PyTorch model, else ``onnx-fp32``), in report order."""
ALLOWED_SKIPS = {entry.name: entry.may_skip for entry in BACKENDS if entry.may_skip}
"""The only backends verify may skip, and when. Any other backend that cannot run fails the verdict."""


def gated(low: str) -> tuple[str, ...]:
    """The backends the gate judges, for a plan whose low type is ``low``."""
    return tuple(entry.named(low) for entry in BACKENDS if entry.gated)


def required(low: str, *, has_model: bool) -> tuple[str, ...]:
    """The backends a verdict needs to have run."""
    return tuple(entry.named(low) for entry in BACKENDS
                 if entry.required == ALWAYS or (entry.required == WITH_MODEL and has_model))


def mapped_if_readable(mixed: Path) -> dict[str, np.ndarray]:
    """The mixed model's weights memory-mapped (:func:`mapped_weights`); none when they cannot be (the sessions
    then read the file themselves, and report what is wrong with it)."""
    try:
        return mapped_weights(mixed)
    except Exception:  # noqa: BLE001 - only an optimization; the backends report an unreadable model
        return {}


def shared_parameters(model: Any, fp32_onnx: Path) -> dict[str, np.ndarray]:
    """The PyTorch model's FP32 parameters and buffers (1 MB and up) that the FP32 ONNX holds under the same name and
    shape, as arrays viewing the tensors: ONNX Runtime runs ``onnx-fp32`` on them in place instead of loading a
    second copy of the weights. Weights the exporter transformed (a folded transpose) are read from the file."""
    import onnx
    import torch

    if not isinstance(model, torch.nn.Module):
        return {}
    proto = onnx.load(str(fp32_onnx), load_external_data=False)
    wanted = {tensor.name: tuple(tensor.dims) for tensor in proto.graph.initializer
              if tensor.data_type == onnx.TensorProto.FLOAT}
    del proto
    shared = {}
    for name, tensor in model.state_dict().items():
        if name in wanted and tensor.dtype == torch.float32 and tuple(tensor.shape) == wanted[name] \
                and tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.nbytes >= 1 << 20:
            shared[name] = tensor.detach().numpy()
    return shared
