"""Triton Inference Server support: model repositories generated from the graph specs.

- :mod:`.config`: ``config.pbtxt`` text for each graph model and for the ``acestep`` orchestrator, derived
  from the same :class:`~acestep_trt.runtime.specs.GraphSpec` objects as ONNX axes and runtime checks.
- :mod:`.repository`: ``write_repository`` (``acestep-trt triton``): the model repository on disk.
- :mod:`.serving`: what the orchestrator runs inside the python backend: BLS graph runners plugged into
  :class:`~acestep_trt.runtime.AceStepRuntime`, request parsing and per-request errors.
- :mod:`.client`: a ``tritonclient`` (HTTP or gRPC) call of the orchestrator.
- :mod:`.server`: start/stop the Triton server shipped in ``nvidia-pytriton`` on 127.0.0.1 (tests, demos).

``model_orchestrator.py`` and ``model_onnx_shim.py`` are python-backend ``model.py`` templates copied into
the repository; they import ``triton_python_backend_utils`` and only run inside Triton.
Nothing here imports torch; ``tritonclient`` is imported only by :mod:`.client`.
"""
