"""From a loaded model to an FP32 ONNX that remembers where every node came from: export strategies, the FX facts
the ONNX graph no longer shows, provenance, and ONNX files exported elsewhere."""
