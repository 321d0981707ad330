"""Python-backend stand-in for an ``onnxruntime_onnx`` graph model (copied to ``<graph>/1/model.py``).

Written only with ``acestep-trt triton --python-onnx-shim``, for Triton servers that lack the onnxruntime
backend (the server in ``nvidia-pytriton`` ships the python backend only). Its config
(``<graph>/configs/python_onnx.pbtxt``, selected with ``tritonserver --model-config-name=python_onnx``) is
the real ``config.pbtxt`` with the platform line replaced by ``backend: "python"``: same name, tensors, data
types, dims, reshape, batching and instances. It runs the same ``model.onnx`` with ONNX Runtime on CPU.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # exists only inside the python backend


class TritonPythonModel:
    """Inputs/outputs exactly as in the model config; one ONNX Runtime session per instance."""

    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1  # several instances and models share the host's cores
        path = Path(__file__).resolve().parent / "model.onnx"
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def _one(self, request):
        # Triton has already applied the config's `reshape` (timestep arrives as [B], not [B, 1]).
        feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
        values = self.session.run(self.outputs, feeds)
        tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values)]
        return pb_utils.InferenceResponse(tensors)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as err:  # noqa: BLE001  an error response for this request only
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(err).__name__}: {err}")))
        return responses
