"""Child processes for the export's heavy steps (tracing a graph, quantising it), started cheaply.

Each graph is traced in a process of its own, because torch's ONNX exporter keeps references to the traced
module's parameters after export (see ``exporter._export_group``): only a process exit returns that memory.
A spawned child imports torch, diffusers, transformers and onnxscript anew each time (seconds per graph,
most of the tiny export). Instead the children are forked from multiprocessing's *fork server*: one
process, started on first use, that has imported those libraries (:data:`PRELOAD`) and loads no weights.
A fork starts in milliseconds, shares the imported code copy-on-write, and its memory still goes back
to the system when it exits. The fork server exits with this process.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from acestep_trt.runtime.errors import BackendError


# Imported once by the fork server (set before it starts): what every child needs.
PRELOAD = ["acestep_trt.export._preload"]


def context():
    """The ``forkserver`` multiprocessing context with :data:`PRELOAD` (``spawn`` where there is no fork server:
    Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_in_child(what: str, fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` in a fresh child process; its result, or its exception re-raised here.

    A child that dies (signal, out of memory) is a :class:`BackendError` naming ``what`` it was doing;
    Ctrl-C or SIGTERM here stops the child at once instead of waiting for it to finish.
    """
    child = ProcessPoolExecutor(max_workers=1, mp_context=context())
    try:
        return child.submit(fn, *args).result()
    except BrokenProcessPool:
        raise BackendError(f"the process {what} died (killed by a signal or out of memory).",
                           "free memory (the full-size DiT needs about 7 GiB) and run the export again.") from None
    except BaseException:  # Ctrl-C or SIGTERM: do not wait for the child to finish
        _stop_workers(child)
        raise
    finally:
        child.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool) -> None:
    """Terminate a ProcessPoolExecutor's workers now (``terminate_workers`` exists from Python 3.14 on)."""
    stop = getattr(pool, "terminate_workers", None)
    if stop is not None:
        stop()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.join(timeout=10)
