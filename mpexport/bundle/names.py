"""One name per thing: every artifact's key (what the manifest and the commands call it), the file it is written
under, its description in messages, and the other fixed file names of an output directory.

Code refers to an artifact by its key only; the file comes from :data:`FILE_NAMES` (a key is never a file name).
"""

from __future__ import annotations

STAGE = "bundle"
MANIFEST = "manifest.json"
TEMP_PREFIX = ".mpexport-tmp-"
"""Prefix of temporary files and directories inside a bundle (swept when the command that made them died)."""
REPOSITORY_MARKER = ".mpexport-repository"
"""The file that marks a Triton model repository written by ``package`` (so ``--force`` may replace it)."""

FP32_ONNX, PROVENANCE, RANGES, PLAN = "fp32_onnx", "provenance", "ranges", "plan"
MIXED_ONNX, ENGINE, REPORT, REPORT_HTML, REPAIR = "mixed_onnx", "engine", "report", "report_html", "repair"
REPAIR_POLICY = "repair_policy"
TRAINING_RANGES = "training_ranges"
FILE_NAMES = {FP32_ONNX: "model.fp32.onnx", PROVENANCE: "provenance.json", RANGES: "ranges.json", PLAN: "plan.json",
              MIXED_ONNX: "model.mixed.onnx", ENGINE: "model.plan", REPORT: "report.json", REPORT_HTML: "report.html",
              REPAIR: "repair.json", REPAIR_POLICY: "repair.policy.toml", TRAINING_RANGES: "training_ranges.json"}
"""Artifact key -> the file name mpexport writes it under."""
DESCRIPTIONS = {FP32_ONNX: "FP32 ONNX model", PROVENANCE: "provenance record", RANGES: "calibration statistics",
                PLAN: "precision plan", MIXED_ONNX: "mixed-precision model", ENGINE: "TensorRT engine",
                REPORT: "parity report", REPORT_HTML: "HTML parity report", REPAIR: "repair record",
                REPAIR_POLICY: "repair policy file", TRAINING_RANGES: "range evidence from training"}
ENGINE_LAYERS = "engine_layers.json"
TIMING_CACHE = "timing.cache"
ENGINE_COMPANIONS = (ENGINE_LAYERS, TIMING_CACHE)
"""Files recorded as part of the engine artifact: the engine inspector's layer listing and TensorRT's timing cache."""
COMPANIONS = {FP32_ONNX: (f"{FILE_NAMES[FP32_ONNX]}.data",), MIXED_ONNX: (f"{FILE_NAMES[MIXED_ONNX]}.data",),
              ENGINE: ENGINE_COMPANIONS}
"""Artifact key -> the other files it may consist of (an ONNX model's external data, the engine's companions)."""


def artifact_files(key: str) -> frozenset[str]:
    """Every file name artifact ``key`` may consist of (its main file first among them): a manifest naming any other
    file for it is damaged or tampered with, never followed."""
    return frozenset((FILE_NAMES[key], *COMPANIONS.get(key, ())))


VERDICTS = ("export_check", "lint", "engine", "verify")
"""Manifest sections that certify artifacts (each records what it covered)."""
