"""The names of the autocast policies a model can be trained under, shared by the stages that take one from the
user (``save``, ``convert``, ``verify``) and the policy tables that define them (:mod:`mpexport.precision.policy`)."""

POLICY_NAMES = ("cuda-fp16", "cuda-bf16", "cpu-fp16", "cpu-bf16")
"""The device autocast ran on, and its low precision."""
DEFAULT_POLICY = "cuda-fp16"
"""The policy assumed when neither the user nor a training record names one."""
