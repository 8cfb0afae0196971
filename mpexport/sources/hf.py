"""Hugging Face model directories (``save_pretrained``, a Trainer's output directory or one of its checkpoints)
as convert's input.

The model is built from ``config.json`` with transformers (the class named in ``architectures``, or the head a
``--task`` names) and its weights (``model.safetensors``, sharded safetensors with an index, or
``pytorch_model.bin``, which transformers reads with ``weights_only=True``). Its inputs are the forward
signature's, shaped from the validation data's arrays with the batch and sequence dims dynamic, or, without
data, example inputs made from the config (vocabulary, image size). Outputs are the model output's tensor fields
(``logits``, ``last_hidden_state``...). The training precision comes from the Trainer's ``training_args.bin``
(:mod:`mpexport.sources.records`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.files import regular_file
from mpexport.base.specs import TensorSpec

STAGE = "load"
FORMAT_HF = "huggingface"
TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "feature-extraction": "AutoModel",
}
"""``--task`` names and the transformers auto class that builds the head for each."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
EXAMPLE_SEQUENCE = 16
MAX_CONFIG_BYTES = 16 << 20
"""Most bytes of a ``config.json`` (a config with labels for every ImageNet-21k class takes under 1 MiB)."""
SIZE_KEY = re.compile(r"(num|n)_\w+|\w+_(size|layers|heads|dim|dims|channels|experts|embeddings|positions|length)"
                      r"|hidden_size|intermediate_size|d_model|d_ff|d_kv|d_head")
"""``config.json`` keys that hold a size (a count of layers, heads, channels...): never negative. Keys naming a
window are left out (``-1`` means no window in some configs)."""


def is_hf_directory(path: Path) -> bool:
    """True for a directory holding a transformers ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def directory_digest(path: Path) -> str:
    """SHA-256 over the files that define the model (config, weights and their index, training arguments),
    by name and content: the same directory gives the same digest wherever it lies."""
    from mpexport.base.files import sha256_file
    from mpexport.sources.records import find_training_args

    digest = hashlib.sha256()
    names = ["config.json", *WEIGHT_FILES]
    files = sorted({path / name for name in names if (path / name).is_file()} |
                   {file for pattern in ("model-*.safetensors", "pytorch_model-*.bin") for file in path.glob(pattern)})
    training_args = find_training_args(path)
    files += [training_args] if training_args is not None else []
    for file in files:
        regular_file(file, "model file", stage=STAGE)
        digest.update(f"{file.relative_to(path)}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


@dataclass
class HFModel:
    """A model built from a Hugging Face directory, with what convert needs to know about it."""

    module: Any
    input_names: list[str]
    """The forward signature's named parameters."""
    required_inputs: list[str]
    suggested_specs: list[TensorSpec]
    """Input specs the config implies (:func:`suggested_specs`)."""
    training: dict[str, Any]
    """The Trainer's record (:meth:`mpexport.sources.records.TrainingRecord.to_training`), empty without one."""
    notes: list[str]


def load_hf_directory(path: Path, task: str | None = None) -> HFModel:
    """Build the model a Hugging Face directory holds, in FP32 and eval mode, with its inputs and training record.

    Raises :class:`MpexportError` (one line) when transformers is missing, the config or weights are absent or
    unreadable, the architecture is unknown, or ``task`` is not one of :data:`TASKS`.
    """
    import torch

    try:
        import transformers
    except ImportError:
        raise MpexportError(f"'{path}' is a Hugging Face model directory, and transformers is not installed",
                            stage=STAGE, hint="pip install 'mpexport[hf]'") from None
    check_config_sizes(path / "config.json")
    config = _config(transformers, path)
    weights = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise MpexportError(f"'{path}' has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})",
                            stage=STAGE, hint="save the model with save_pretrained, or point at a checkpoint-N folder")
    check_weight_files(path, weights)
    model_class = _model_class(transformers, config, task, path)
    logging = transformers.utils.logging
    progress, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()  # convert draws its own progress
    logging.set_verbosity_error()  # transformers' load report: the weights check below says what matters, in a line
    try:
        model, info = model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                  output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any failure to build the model is bad input
        raise MpexportError(f"'{path}' cannot be loaded as {model_class.__name__}: {first_line(exc)}",
                            stage=STAGE) from None
    finally:
        logging.set_verbosity(verbosity)
        if progress:
            logging.enable_progress_bar()
    notes = [f"built {type(model).__name__} from {path.name}/config.json and {weights[0]}"]
    notes += check_weights_used(info, path, task, lambda: _own_weights(transformers, config, path))
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a cache is a generation feature, not an output
    names, required = _signature(model)
    training, record_notes = _training_record(path)
    notes += record_notes
    specs = suggested_specs(model.config, names, getattr(model, "main_input_name", None) or (names or [""])[0])
    return HFModel(model, names, required, specs, training, notes)


def _training_record(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The Trainer's record (``training_args.bin``) with the last evaluation ``trainer_state.json`` logged, each
    read only within :data:`mpexport.sources.bounds.MAX_RECORD_BYTES`; and notes on what was not read."""
    from mpexport.sources.bounds import oversized
    from mpexport.sources.records import find_training_args, read_trainer_args

    training: dict[str, Any] = {}
    notes: list[str] = []
    args_path = find_training_args(path)
    if args_path is not None:
        shown = str(args_path.relative_to(path))
        note = oversized(regular_file(args_path, "training record", stage=STAGE).stat().st_size, shown)
        if note is None:
            training = read_trainer_args(args_path, shown=shown).to_training()
        else:
            notes.append(note)
    validation, note = _trainer_state_validation(path)
    if validation is not None:
        training["validation"] = validation
    return training, [*notes, *([note] if note else [])]


def _trainer_state_validation(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The last evaluation in the Trainer's ``trainer_state.json`` (beside the model, else in its newest
    ``checkpoint-N``), and a note when the file could not be read."""
    from mpexport.sources.accuracy import trainer_state_validation
    from mpexport.sources.bounds import read_record_file

    state_path = _newest(path, "trainer_state.json")
    if state_path is None:
        return None, None
    shown = str(state_path.relative_to(path))
    data, note = read_record_file(regular_file(state_path, "training record", stage=STAGE), shown)
    if data is None:
        return None, note
    try:
        state = json.loads(data)
    except (ValueError, RecursionError):
        return None, f"training record {shown} not read: it is not JSON"
    return trainer_state_validation(state, shown), None


def _newest(path: Path, name: str) -> Path | None:
    """``name`` in a Trainer output directory, else in its newest ``checkpoint-N`` folder."""
    if (path / name).is_file():
        return path / name
    found = [(int(folder.name.split("-", 1)[1]), folder / name) for folder in path.glob("checkpoint-*")
             if folder.name.split("-", 1)[1].isdigit() and (folder / name).is_file()]
    return max(found)[1] if found else None


def check_config_sizes(path: Path) -> None:
    """A one-line :class:`MpexportError` naming the first size in ``config.json`` (nested configs included) that is
    negative (``num_hidden_layers: -5``), or for a file that is not a JSON object within
    :data:`MAX_CONFIG_BYTES`. transformers builds whatever such a config says (``range(-5)`` is no layers)."""
    regular_file(path, "config", stage=STAGE)
    with path.open("rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise MpexportError(f"'{path}' takes over {MAX_CONFIG_BYTES >> 20} MiB: not a model config", stage=STAGE)
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MpexportError(f"'{path}' is not a readable transformers config: {first_line(exc)}",
                            stage=STAGE) from None
    if not isinstance(config, dict):
        raise MpexportError(f"'{path}' is not a transformers config (a JSON object)", stage=STAGE)
    for key, value in _sizes(config, ""):
        if value < 0:
            raise MpexportError(f"'{path}' sets {key} to {value}: a size cannot be negative", stage=STAGE,
                                hint="fix config.json: the model built from it would not be the model trained")


def _sizes(config: dict[str, Any], prefix: str, depth: int = 0) -> Iterator[tuple[str, int]]:
    """Every integer under a size key (:data:`SIZE_KEY`), with its dotted path, in nested configs up to 8 deep."""
    for key, value in config.items():
        if isinstance(value, dict) and depth < 8:
            yield from _sizes(value, f"{prefix}{key}.", depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool) and "window" not in key \
                and SIZE_KEY.fullmatch(key):
            yield f"{prefix}{key}", value


def check_weight_files(path: Path, weights: list[str]) -> None:
    """One-line :class:`MpexportError` unless every weight file transformers will open is a regular file in
    ``path``: the weight files present, and every shard a ``*.index.json`` names (a plain file name, not a path
    that leaves the directory, and not a FIFO or device, which would block or never end)."""
    for name in weights:
        regular_file(path / name, "weights", stage=STAGE)
        if not name.endswith(".index.json"):
            continue
        try:
            with (path / name).open("rb") as handle:
                index = json.loads(handle.read(MAX_CONFIG_BYTES + 1))
            shards = set(index["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise MpexportError(f"'{path / name}' is not a weights index (a weight_map of file names)",
                                stage=STAGE) from None
        for shard in sorted(map(str, shards)):
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise MpexportError(f"'{path / name}' names '{shard}', which is not a file beside it", stage=STAGE)
            regular_file(path / shard, "weights shard", stage=STAGE)


def check_weights_used(info: dict[str, Any], path: Path, task: str | None,
                       own_weights: Callable[[], set[str]]) -> list[str]:
    """One-line :class:`MpexportError` unless the model built from ``config.json`` uses every weight in the files
    and finds every weight it needs there (transformers' ``output_loading_info``): a config that builds fewer
    layers than the files hold, or a head the files have no weights for (random), is not the model trained.
    With ``task``, weights of the config's own head that the ``task`` head leaves out (``own_weights``: the names
    of the config's architecture) are allowed, with a note."""
    missing = sorted(map(str, info.get("missing_keys") or []))
    unexpected = sorted(map(str, info.get("unexpected_keys") or []))
    mismatched = [str(item[0]) if isinstance(item, tuple) else str(item) for item in info.get("mismatched_keys") or []]
    if mismatched:
        raise MpexportError(f"{len(mismatched)} weights in the files do not have the shape the model built from "
                            f"{path.name}/config.json needs (e.g. {mismatched[0]})", stage=STAGE)
    if missing:
        raise MpexportError(f"{len(missing)} weights the model built from {path.name}/config.json needs are not in "
                            f"the files (e.g. {missing[0]}): they would be random", stage=STAGE,
                            hint="choose the --task the model was trained for, or fix config.json" if task else
                            "fix config.json, or save the model again with save_pretrained")
    if not unexpected:
        return []
    if task is not None and set(unexpected) <= own_weights():
        return [f"--task {task}: {len(unexpected)} weights of the saved head are not used (e.g. {unexpected[0]})"]
    raise MpexportError(f"{len(unexpected)} weights in the files are not used by the model built from "
                        f"{path.name}/config.json (e.g. {unexpected[0]})", stage=STAGE,
                        hint="config.json does not describe the weights beside it: fix it, or save the model again "
                        "with save_pretrained")


def _own_weights(transformers: Any, config: Any, path: Path) -> set[str]:
    """The weight names of the config's own architecture, built without memory (on the meta device)."""
    import torch

    try:
        model_class = _model_class(transformers, config, None, path)
        with torch.device("meta"):
            return set(model_class(config).state_dict())
    except Exception:  # noqa: BLE001 - no architecture to compare with: every unused weight is an error
        return set()


def _config(transformers: Any, path: Path) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is bad input
        raise MpexportError(f"'{path / 'config.json'}' is not a readable transformers config: {first_line(exc)}",
                            stage=STAGE) from None


def _model_class(transformers: Any, config: Any, task: str | None, path: Path) -> Any:
    if task is not None:
        if task not in TASKS:
            raise MpexportError(f"unknown --task '{task}'", stage=STAGE, hint=f"use one of {', '.join(TASKS)}")
        return getattr(transformers, TASKS[task])
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    what = f"architectures {architectures} this transformers does not know" if architectures else "no architecture"
    raise MpexportError(f"'{path}/config.json' names {what}", stage=STAGE, hint=f"pass --task ({', '.join(TASKS)})")


def _signature(model: Any) -> tuple[list[str], list[str]]:
    parameters = inspect.signature(model.forward).parameters.values()
    names = [p.name for p in parameters if p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                                           inspect.Parameter.VAR_POSITIONAL)]
    main = getattr(model, "main_input_name", None)
    return names, [main] if main in names else names[:1]


def suggested_specs(config: Any, names: list[str], main_input: str) -> list[TensorSpec]:
    """Input specs the config implies: token ids, mask, token types and positions with a dynamic batch and
    sequence, or pixel values of the config's image size with a dynamic batch; none for other inputs (validation
    data or ``--input`` then say). They give which dims of validation data are dynamic; without data, convert
    takes those of the required inputs and the attention mask (example ids: ones, below any vocabulary)."""
    sizes = {"batch": 2, "sequence": min(EXAMPLE_SEQUENCE, getattr(config, "max_position_embeddings", 512) or 512)}
    specs = []
    if main_input == "pixel_values":
        vision = getattr(config, "vision_config", config)
        side = getattr(vision, "image_size", 224)
        height, width = (side, side) if isinstance(side, int) else tuple(side)
        channels = getattr(vision, "num_channels", 3)
        specs.append(TensorSpec("pixel_values", "float32", ("batch", channels, height, width), {"batch": 2}))
    elif main_input in SEQUENCE_INPUTS:
        specs += [TensorSpec(name, "int64", ("batch", "sequence"), dict(sizes))
                  for name in dict.fromkeys((main_input, *SEQUENCE_INPUTS)) if name in names]
    return specs
