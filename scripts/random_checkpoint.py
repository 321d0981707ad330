#!/usr/bin/env python
"""Write a random-weight ACE-Step 1.5 checkpoint in diffusers layout at tiny, mid or full-size geometry.

    .venv/bin/python scripts/random_checkpoint.py --size full /tmp/full-ckpt

Full size is the real turbo geometry (about 2.9 B parameters, 11.6 GB in float32): for measuring export
cost and speed without the real weights.
"""

import argparse
import logging
import time

from acestep_trt.export.tiny import TinyConfig, save_tiny_checkpoint

log = logging.getLogger("random_checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=["tiny", "mid", "full"], default="tiny")
    parser.add_argument("--base", action="store_true", help="a non-turbo (base, APG guidance) checkpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {"is_turbo": not args.base}
    cfg = {"tiny": TinyConfig, "mid": TinyConfig.mid_size, "full": TinyConfig.full_size}[args.size](**overrides)
    started = time.perf_counter()
    save_tiny_checkpoint(args.out_dir, cfg)
    log.info("%s checkpoint written to %s in %.1f s", args.size, args.out_dir, time.perf_counter() - started)


if __name__ == "__main__":
    main()
