#!/usr/bin/env python
"""Peak memory of a command and every process it starts (Linux), e.g. an export with its tracing children.

    .venv/bin/python scripts/peak_memory.py -- .venv/bin/acestep-trt export /tmp/full-ckpt /tmp/full-art

``/usr/bin/time -v`` reports the largest resident set of the command or of a child it waited for; the
export's tracing children are children of its fork server, which is never waited for, so their memory does
not show there. This samples the whole process tree every ``--interval`` seconds instead and reports, at
the end, the peak of the tree's summed proportional set size (PSS: pages shared between processes, such
as the libraries a forked child shares with the fork server, counted once in all), the peak of its summed
anonymous resident memory (``RssAnon``: what the processes allocated, as opposed to file pages mapped from
disk, such as a memory-mapped checkpoint, which the kernel can drop under pressure and read again) and the
peak resident set of its largest single process, with the name of that process. The command's exit code is
passed on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

GIB = 1 << 30


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except OSError:
        pass
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its descendants that exist now."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


class TreeSampler(threading.Thread):
    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_pss = self.peak_rss = self.peak_anon = self.peak_rss_anon = 0
        self.peak_rss_name = ""
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = tree(self.root)
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) * 1024
            self.peak_pss = max(self.peak_pss, pss)
            anon = {p: _kib(f"/proc/{p}/status", "RssAnon:") * 1024 for p in pids}
            self.peak_anon = max(self.peak_anon, sum(anon.values()))
            for pid in pids:
                rss = _kib(f"/proc/{pid}/status", "VmRSS:") * 1024
                if rss > self.peak_rss:
                    self.peak_rss, self.peak_rss_anon, self.peak_rss_name = rss, anon[pid], _name(pid)
            self.done.wait(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default 0.2)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    started = time.perf_counter()
    process = subprocess.Popen(command)
    sampler = TreeSampler(process.pid, args.interval)
    sampler.start()
    code = process.wait()
    sampler.done.set()
    sampler.join()
    print(f"peak memory of the process tree: PSS {sampler.peak_pss / GIB:.2f} GiB, anonymous "
          f"{sampler.peak_anon / GIB:.2f} GiB (each summed over its processes); largest single process RSS "
          f"{sampler.peak_rss / GIB:.2f} GiB, {sampler.peak_rss_anon / GIB:.2f} GiB of it anonymous "
          f"({sampler.peak_rss_name}); wall {time.perf_counter() - started:.1f} s; exit code {code}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
