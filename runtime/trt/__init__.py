"""TensorRT engines for the graphs (the four core ones and the audio-to-audio ones): optimisation profiles,
the engine manifest and the builder.

Nothing here imports ``tensorrt`` at module import time: the library is imported when a build or a
load starts, so that the runtime works (on ONNX Runtime) where TensorRT is not installed.

- :mod:`.profiles`: typed shape ranges derived from the graph specs and the user's duration/batch ranges.
- :mod:`.libs`: importing TensorRT and cuda-bindings, GPU compute capability, with install hints.
- :mod:`.onnx_support`: TensorRT's documented ONNX operator support (data) and a check of a graph against it.
- :mod:`.manifest`: ``engines.json`` (what each engine was built from and with) and the refusal checks.
- :mod:`.builder`: ``build_engines`` through the TensorRT Python API (``acestep-trt build``).
"""
