"""``python -m memory --host 127.0.0.1 --port 8401 --data DIR [--token TOKEN]``: run the service.

One process, one worker: the rings and indexes live in this process's memory, so a second worker
would see different data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from memory.app import check_token, create_app
from memory.settings import LOOPBACK_HOSTS, Settings

log = logging.getLogger("memory")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Settings(data_dir=Path("memory-data"))
    parser = argparse.ArgumentParser(prog="python -m memory", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=8401)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("MEMORY_DATA", "memory-data")),
        help="directory of the durable log (env MEMORY_DATA)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("MEMORY_TOKEN"),
        help="bearer token required on every request (env MEMORY_TOKEN); "
        "mandatory when --host is not a loopback address",
    )
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    parser.add_argument("--default-capacity", type=int, default=defaults.default_capacity)
    parser.add_argument(
        "--max-memory-mb",
        type=float,
        # A string default goes through ``type``: a bad MEMORY_MAX_MB is a usage error.
        default=os.environ.get("MEMORY_MAX_MB") or str(defaults.max_memory_bytes // 2**20),
        help="RAM all collections may reserve together, in MiB (env MEMORY_MAX_MB; default: half "
        "the machine's, here %(default)s); a collection beyond it is refused with 507",
    )
    parser.add_argument(
        "--exact-max",
        type=int,
        default=defaults.exact_max,
        help="stored states up to which search is exact; faiss IVF beyond",
    )
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe)
    parser.add_argument("--faiss-threads", type=int, default=defaults.faiss_threads)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (slower)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.token:  # a blank one ("   ") would be matched by "Bearer " and no token at all
        try:
            check_token(args.token)
        except ValueError as exc:
            log.error("%s (--token or MEMORY_TOKEN)", exc)
            return 2
    if not args.max_memory_mb > 0:
        log.error("--max-memory-mb (or MEMORY_MAX_MB) must be positive, got %s", args.max_memory_mb)
        return 2
    if args.host not in LOOPBACK_HOSTS and not args.token:
        log.error(
            "refusing to bind %s without a token: pass --token or set MEMORY_TOKEN", args.host
        )
        return 2
    settings = Settings(
        data_dir=args.data,
        token=args.token or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        default_capacity=args.default_capacity,
        max_memory_bytes=int(args.max_memory_mb * 2**20),
        exact_max=args.exact_max,
        nprobe=args.nprobe,
        faiss_threads=args.faiss_threads,
        seed=args.seed,
    )
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
