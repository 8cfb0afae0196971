"""ONNX graphs on onnx-ir: walking them with their subgraphs, retyping them as a plan says (rewrite), the strict
low-precision emulation, lint, reading and writing weights and model files. Nothing here knows about torch."""
