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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError, first_line
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

    from mpexport.sources.records import find_training_args, read_trainer_args

    try:
        import transformers
    except ImportError:
        raise MpexportError(f"'{path}' is a Hugging Face model directory, and transformers is not installed",
                            stage=STAGE, hint="pip install 'mpexport[hf]'") from None
    config = _config(transformers, path)
    weights = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise MpexportError(f"'{path}' has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})",
                            stage=STAGE, hint="save the model with save_pretrained, or point at a checkpoint-N folder")
    model_class = _model_class(transformers, config, task, path)
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # convert draws its own progress
    try:
        model = model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure to build the model is bad input
        raise MpexportError(f"'{path}' cannot be loaded as {model_class.__name__}: {first_line(exc)}",
                            stage=STAGE) from None
    finally:
        if progress:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a cache is a generation feature, not an output
    names, required = _signature(model)
    notes = [f"built {type(model).__name__} from {path.name}/config.json and {weights[0]}"]
    training: dict[str, Any] = {}
    args_path = find_training_args(path)
    if args_path is not None:
        record = read_trainer_args(args_path, shown=str(args_path.relative_to(path)))
        training = record.to_training()
    specs = suggested_specs(model.config, names, getattr(model, "main_input_name", None) or (names or [""])[0])
    return HFModel(model, names, required, specs, training, notes)


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
