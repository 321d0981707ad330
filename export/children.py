"""Child processes for the export's heavy steps (tracing a graph, quantising it), started cheaply.

Each graph is traced in a process of its own, because torch's ONNX exporter keeps references to the traced
module's parameters after export (see ``exporter._export_group``): only a process exit returns that memory.
A spawned child imports torch, diffusers, transformers and onnxscript anew each time (seconds per graph,
most of the tiny export). Instead the children are forked from multiprocessing's *fork server*: one
process that has imported those libraries and warmed torch's exporter up (:data:`PRELOAD`,
``export/_preload.py``) and loads no weights. A fork starts in milliseconds, shares the imported code
copy-on-write, and its memory still goes back to the system when it exits. The fork server exits with
this process. :func:`start` starts it early, so that its imports overlap with the caller's own work.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Iterable

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


# Signals held back while this process talks to the fork server (see :func:`signals_held`).
HELD_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


@contextmanager
def signals_held(signals: Iterable[int] = HELD_SIGNALS):
    """Hold Ctrl-C, SIGTERM and SIGHUP back until the block ends, then deliver the first one that came.

    Starting a child means connecting to the fork server and then sending it the request; an exception raised
    by a signal between the two makes the fork server die with a traceback on the terminal. The block is
    short (milliseconds), so the interruption is only delayed, never lost. (Handlers can only be set in the
    main thread; elsewhere nothing is held: Python runs signal handlers in the main thread only.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])  # now, with the handler that was in place (raise, or die)


def start() -> None:
    """Start the fork server now and return at once: it imports :data:`PRELOAD` while the caller goes on."""
    if context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        with signals_held():
            forkserver.ensure_running()


def cores() -> int:
    """CPU cores this process may use (its affinity mask, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_in_child(what: str, fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` in a fresh child process; its result, or its exception re-raised here.

    A child that dies (signal, out of memory) is a :class:`BackendError` naming ``what`` it was doing;
    Ctrl-C or SIGTERM here stops the child at once instead of waiting for it to finish.
    """
    return next(run_jobs([(what, fn, args)], workers=1))[1]


def run_jobs(jobs: list[tuple[str, Callable, tuple]], workers: int,
             on_start: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
    """Run each ``(what, fn, args)`` of ``jobs`` in a fresh child, at most ``workers`` at once, in list order.

    Yields ``(index, result)`` as jobs finish; ``on_start(index)`` is called as each is handed to a child.
    With one worker the next child starts only when the caller asks for the next result, so whatever the caller does with a result (validation) never overlaps a
    child; with more, the next child starts first and torch in each child gets ``cores() // workers``
    threads. An exception in a child, or here (Ctrl-C, SIGTERM), stops every child at once and propagates.
    """
    threads = max(1, cores() // workers) if workers > 1 else 0
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context(), max_tasks_per_child=1,
                               initializer=_child_ignores_ctrl_c)
    pending: dict = {}
    queue = list(enumerate(jobs))

    def submit_next() -> None:
        index, (what, fn, args) = queue.pop(0)
        if on_start is not None:
            on_start(index)
        with signals_held():  # submit starts the child: connect to the fork server, then send the request
            pending[pool.submit(_call, threads, fn, args)] = (index, what)

    try:
        while queue or pending:
            while queue and len(pending) < workers:
                submit_next()
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: pending[f][0]):
                index, what = pending.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise BackendError(f"the process {what} died (killed by a signal or out of memory).",
                                       "free memory (the full-size DiT needs about 7 GiB) and run the export "
                                       "again.") from None
                if workers > 1 and queue:  # keep the cores busy while the caller uses this result
                    submit_next()
                yield index, result
    except BaseException:  # a failed job, Ctrl-C or SIGTERM: do not wait for the other children to finish
        previous_hook = threading.excepthook
        threading.excepthook = _quiet_pool_threads(pool, previous_hook)
        try:
            stop_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            threading.excepthook = previous_hook
        raise
    pool.shutdown(wait=True, cancel_futures=True)


def _quiet_pool_threads(pool, previous):
    """A ``threading.excepthook`` that drops errors of ``pool``'s manager thread (and passes others on).

    While its workers are being killed on purpose, the pool's manager thread can fail reading from them; that
    error is the expected consequence of stopping, and printing its traceback would only alarm the user.
    """
    def hook(args):
        if args.thread is not None and args.thread is getattr(pool, "_executor_manager_thread", None):
            return
        previous(args)

    return hook


def _child_ignores_ctrl_c() -> None:
    """In each child: ignore SIGINT. Ctrl-C reaches the whole process group; the parent then stops its children
    itself (SIGTERM), so a child's own KeyboardInterrupt would only print a second traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(threads: int, fn: Callable, args: tuple) -> Any:
    """In the child: ``fn(*args)``, torch limited to ``threads`` (0: its default) when children share the cores."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(*args)


def stop_workers(pool) -> None:
    """Terminate a ProcessPoolExecutor's workers now (``terminate_workers`` exists from Python 3.14 on)."""
    stop = getattr(pool, "terminate_workers", None)
    if stop is not None:
        stop()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.join(timeout=10)
