"""The precision plan: the training autocast policy as data (tables, their extraction, the CPU oracle), patterns
for ONNX graphs without aten provenance, calibration ranges, the plan's options and types, the planner, and
agreement between plans."""
