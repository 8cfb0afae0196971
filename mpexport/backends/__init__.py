"""Runners, one module per framework (PyTorch, ONNX Runtime, TensorRT), all with the interface of
:class:`~mpexport.backends.base.Runner`, so a comparison never cares which backend it compares."""
