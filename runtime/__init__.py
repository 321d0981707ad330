"""PyTorch-free runtime: ``from acestep_trt.runtime import AceStepRuntime``.

Needs NumPy, ``tokenizers``, ``safetensors`` and ONNX Runtime; never imports torch, diffusers or
transformers.
"""

from .errors import AceStepError, ArtifactError, BackendError, CheckpointError, ExportValidationError, InputError
from .pipeline import AceStepOutput, AceStepRuntime

__all__ = [
    "AceStepRuntime",
    "AceStepOutput",
    "AceStepError",
    "ArtifactError",
    "BackendError",
    "CheckpointError",
    "ExportValidationError",
    "InputError",
]
