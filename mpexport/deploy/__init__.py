"""Deployment targets: the TensorRT engine (strongly typed, built from the mixed ONNX) and the Triton model
repository."""
