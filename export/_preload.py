"""Imported once by the export's fork server (:mod:`acestep_trt.export.children`): the libraries every
tracing child needs and a warmed-up exporter (``export/warmup.py``), without loading any weights. A failed
import here only makes the children slower to start (multiprocessing ignores preload errors); the child
then imports what it needs itself."""

import logging
import warnings

warnings.simplefilter("ignore")

import onnx  # noqa: E402,F401
import onnxscript  # noqa: E402,F401
import torch  # noqa: E402,F401
import torch.onnx  # noqa: E402,F401
import transformers  # noqa: E402,F401
from diffusers import AutoencoderOobleck  # noqa: E402,F401
from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel  # noqa: E402,F401
from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder  # noqa: E402,F401
from transformers import AutoModel  # noqa: E402,F401

from acestep_trt.export import exporter  # noqa: E402,F401  (the child's entry points)
from acestep_trt.export import warmup  # noqa: E402

exporter.quiet_exporter_logs()
warmup.reuse_onnx_registry()
try:  # only ImportError is ignored by multiprocessing: anything else here would stop the fork server
    warmup.warm_up()
except Exception:  # noqa: BLE001 - a cold exporter is only slower
    logging.getLogger(__name__).debug("exporter warm-up failed", exc_info=True)
