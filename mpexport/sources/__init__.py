"""Models where training leaves them: ``.pt2``, TorchScript, checkpoints with a factory, trusted pickles, Hugging
Face directories, timm and Lightning checkpoints, ONNX; training records read without running code;
``mpexport.save``; the model's inputs."""
