"""Pickled models and checkpoints: state dicts loaded into a ``--factory`` module (or a timm or Lightning
architecture the checkpoint names) with weights-only unpickling; whole pickled modules only with ``--trust-pickle``."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mpexport.base.callables import import_callable, importable_from
from mpexport.base.errors import MpexportError, first_line
from mpexport.sources.model import FORMAT_CHECKPOINT, FORMAT_PICKLE, STAGE, LoadedModel, module_model
from mpexport.sources.records import checkpoint_record, load_checkpoint_without_code

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_pickled(path: Path, digest: str, *, factory: str | None, trust_pickle: bool,
                  import_path: str | Path | None) -> LoadedModel:
    """A checkpoint or pickle: weights-only unpickling first (state dict into ``factory``'s module, or the
    architecture a timm or Lightning checkpoint names), a whole pickled module only with ``trust_pickle``; one-line
    errors otherwise."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        obj = _checkpoint_with_records(path) if not trust_pickle else None
        if obj is None and not trust_pickle:
            raise MpexportError(
                f"'{path}' holds pickled Python objects beyond tensors ({_unsafe_global(exc)}); loading it "
                "would run arbitrary code", stage=STAGE,
                hint="pass --trust-pickle only if you trust where the file came from, "
                "or save a state dict and use --factory",
            ) from None
        if obj is None:
            with importable_from(import_path):
                obj = _load_trusted_pickle(path)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is bad input
        raise MpexportError(f"'{path}' cannot be read as a PyTorch file: {first_line(exc)}", stage=STAGE,
                            hint="the file may be truncated or corrupt") from None
    module = _find_module(obj)
    if module is not None:
        return module_model(FORMAT_PICKLE, path, digest, module, factory=None)
    state_dict = _find_state_dict(obj)
    if state_dict is None:
        raise MpexportError(f"'{path}' holds neither a model nor a state dict ({_describe_object(obj)})",
                            stage=STAGE)
    arch = obj.get("arch") if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str) else None
    if factory:
        module = build_from_factory(factory, import_path)
    elif arch is not None:
        module = _timm_model(path, arch)
    else:
        raise MpexportError(
            f"'{path}' is a checkpoint ({len(state_dict)} tensors) and needs the code that builds the model",
            stage=STAGE, hint="pass --factory package.module:function returning the nn.Module",
        )
    _load_state_dict(module, state_dict, factory or f"timm.create_model('{arch}')")
    model = module_model(FORMAT_CHECKPOINT, path, digest, module, factory=factory)
    record = checkpoint_record(obj, path)
    if record is not None:
        model.training = record.to_training()
    return model


def _checkpoint_with_records(path: Path) -> Any:
    """A zip checkpoint whose non-tensor objects are read as inert records; None when the file is not one (a
    pickled module, a legacy-format file): those need trust."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        obj = load_checkpoint_without_code(path)
    except MpexportError:
        raise
    except Exception:  # noqa: BLE001 - not readable this way: the caller's message stands
        return None
    return obj if _find_state_dict(obj) is not None else None


def _timm_model(path: Path, arch: str) -> torch.nn.Module:
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        raise MpexportError(f"'{path}' is a timm checkpoint of '{arch}', and timm is not installed", stage=STAGE,
                            hint="pass --factory package.module:function building the model, or install timm") from None
    try:
        return timm.create_model(arch, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - an unknown architecture is bad input
        raise MpexportError(f"timm cannot build '{arch}': {first_line(exc)}", stage=STAGE,
                            hint="pass --factory package.module:function building the model") from None


def _unsafe_global(exc: pickle.UnpicklingError) -> str:
    import re

    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    return f"e.g. {match.group(1)}" if match else "not a plain state dict"


def _load_trusted_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise MpexportError(
            f"'{path}' is a pickled model whose code cannot be found: {first_line(exc)}", stage=STAGE,
            hint="run from the directory that holds the model's package, or put it on PYTHONPATH",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is bad input
        raise MpexportError(f"'{path}' cannot be unpickled: {first_line(exc)}", stage=STAGE) from None


def _find_module(obj: Any) -> torch.nn.Module | None:
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in ("model", "module", "net", "network"):
            if isinstance(obj.get(key), torch.nn.Module):
                return obj[key]
    return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()
    )


def _find_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _describe_object(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:6]))
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def build_from_factory(factory: str, import_path: str | Path | None = None) -> torch.nn.Module:
    """Import ``package.module:function`` from ``import_path`` (see :func:`import_callable`) and call it with no
    arguments.

    Raises :class:`MpexportError` when the function cannot be imported or fails, or returns something other
    than an ``nn.Module``.
    """
    target = import_callable(factory, import_path=import_path)
    try:
        with importable_from(import_path):
            module = target()
    except Exception as exc:  # noqa: BLE001 - user code may fail in any way
        raise MpexportError(f"--factory '{factory}' failed: {first_line(exc)}", stage=STAGE) from None
    if not isinstance(module, torch.nn.Module):
        raise MpexportError(
            f"--factory '{factory}' returned a {type(module).__name__}, not a torch.nn.Module", stage=STAGE
        )
    return module


def _load_state_dict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], factory: str) -> None:
    """Load ``state_dict`` into ``module`` strictly: a weight of another shape, a missing weight or a weight the
    module does not use is a one-line error, never a silently different model."""
    wanted = module.state_dict()
    state_dict = _strip_owner_prefix(_strip_wrapper_prefixes(state_dict), set(wanted))
    mismatched = [key for key, value in state_dict.items() if key in wanted and value.shape != wanted[key].shape]
    if mismatched:
        key = mismatched[0]
        raise MpexportError(
            f"the checkpoint does not fit the model built by --factory '{factory}': {len(mismatched)} weights of "
            f"other shapes (e.g. {key}: {tuple(state_dict[key].shape)} in the file, {tuple(wanted[key].shape)} in "
            "the model)", stage=STAGE)
    result = module.load_state_dict(state_dict, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise MpexportError(
            f"the checkpoint does not fit the model built by --factory '{factory}': {'; '.join(detail)} keys",
            stage=STAGE,
        )


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Remove the prefix DataParallel (``module.``) or torch.compile (``_orig_mod.``) put on every key."""
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _strip_owner_prefix(state_dict: Mapping[str, torch.Tensor], wanted: set[str]) -> Mapping[str, torch.Tensor]:
    """Remove the attribute name a training wrapper (a LightningModule's ``self.model``) put before every key,
    when the factory builds the inner model and the stripped keys are exactly the model's."""
    if set(state_dict) == wanted or not state_dict:
        return state_dict
    heads = {key.split(".", 1)[0] for key in state_dict}
    if len(heads) == 1 and all("." in key for key in state_dict):
        stripped = {key.split(".", 1)[1]: value for key, value in state_dict.items()}
        if set(stripped) == wanted:
            return stripped
    return state_dict
