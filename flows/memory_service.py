"""Make sure a Memory service answers before training through it, starting one on loopback if not.

    with ensure_memory_service("http://localhost:8401", "memory-data") as service:
        ...  # service.url answers /v1/health; service.started says whether we started it

A service already answering at the URL is used as it is and left running. If nothing answers and
the URL names this machine (127.0.0.1, localhost, ::1), ``python -m memory --host 127.0.0.1 --port
P --data DIR`` is started as a subprocess, waited for until healthy, and stopped (SIGTERM, then
SIGKILL) when the block ends. A service elsewhere cannot be started from here: if it does not
answer, the block runs anyway and the MemoryClient rides out the outage (local replay, writes kept
in its outbox), which is what the Memory service's clients are built to do.

Synchronous on purpose: the CLI and Prefect tasks (which run in worker threads, possibly inside an
event loop) can both use it. The service runs in its own session, so a Ctrl-C meant for training
does not kill it before the client has delivered its last writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
LOG_NAME = "memory-service.log"
_LOG_TAIL_LINES = 30


class MemoryServiceError(RuntimeError):
    """The service could not be started, or something else answers at its URL.

    ``headline`` is one line (what the CLI prints); the message adds the end of the service's log.
    """

    def __init__(self, headline: str, log_path: Path | None = None) -> None:
        if log_path is not None:
            last = next((line for line in reversed(log_tail(log_path).splitlines()) if line), "")
            headline = f"{headline}: {last.strip()} (log: {log_path})"
        self.headline = headline
        self.log_path = log_path
        detail = f"\nend of {log_path}:\n{log_tail(log_path)}" if log_path is not None else ""
        super().__init__(self.headline + detail)


@dataclass(frozen=True)
class MemoryServiceHandle:
    """What :func:`ensure_memory_service` found or started."""

    url: str
    started: bool
    """True if this process started the service (and will stop it)."""
    healthy: bool
    """False only for a service elsewhere that did not answer (training degrades gracefully)."""
    pid: int | None = None
    log_path: Path | None = None


def _health(url: str, token: str | None, timeout: float) -> int | None:
    """The status of GET /v1/health, or None if nothing answers."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.get(f"{url}/v1/health", headers=headers, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def _check_answer(url: str, status: int) -> None:
    if status == 401:
        raise MemoryServiceError(
            f"the Memory service at {url} refuses our token: set MEMORY_TOKEN to its token"
        )
    raise MemoryServiceError(
        f"something answers at {url} but not as a Memory service (GET /v1/health gave HTTP "
        f"{status}): pick another memory.base_url port"
    )


def _parse(base_url: str) -> tuple[str, str, int]:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MemoryServiceError(f"memory base URL {base_url!r} must look like http://HOST:PORT")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise MemoryServiceError(f"memory base URL {base_url!r}: {exc}") from None
    return base_url.rstrip("/"), parts.hostname, port


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("Memory service (pid %d) ignored SIGTERM; killing it", process.pid)
        process.kill()
        process.wait(10)


@contextmanager
def ensure_memory_service(
    base_url: str = "http://localhost:8401",
    data_dir: str | Path = "memory-data",
    *,
    token: str | None = None,
    autostart: bool = True,
    startup_timeout: float = 60.0,
    stop_timeout: float = 15.0,
    extra_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[MemoryServiceHandle]:
    """Yield a handle on a Memory service answering at ``base_url`` (see the module docstring).

    ``token`` defaults to ``MEMORY_TOKEN``; ``extra_args`` go to ``python -m memory`` (for example
    ``("--exact-max", "50000")``). Raises :class:`MemoryServiceError` with the end of the
    service's log if a service this call starts does not become healthy in ``startup_timeout``
    seconds, or if something other than a Memory service holds the port.
    """
    url, host, port = _parse(base_url)
    token = token if token is not None else os.environ.get("MEMORY_TOKEN") or None
    status = _health(url, token, timeout=2.0)
    if status == 200:
        log.info("using the Memory service at %s", url)
        yield MemoryServiceHandle(url, started=False, healthy=True)
        return
    if status is not None:
        _check_answer(url, status)
    if host not in LOOPBACK_HOSTS or not autostart:
        log.warning(
            "no Memory service answers at %s%s: training goes on with local replay and the "
            "client delivers its writes when the service is back",
            url,
            "" if host in LOOPBACK_HOSTS else " (not this machine, so it is not started here)",
        )
        yield MemoryServiceHandle(url, started=False, healthy=False)
        return

    if base_url.lower().startswith("https"):
        raise MemoryServiceError(
            f"nothing answers at {url}, and a service started here speaks plain http: "
            f"use http://{host}:{port}, or start the service behind TLS yourself"
        )
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    log_path = data / LOG_NAME
    command = [
        sys.executable, "-m", "memory",
        "--host", "::1" if host == "::1" else "127.0.0.1", "--port", str(port), "--data", str(data),
        "--log-level", "warning", *extra_args,
    ]  # fmt: skip
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if token:
        child_env["MEMORY_TOKEN"] = token
    repo = Path(__file__).resolve().parents[1]  # `memory` importable even if not installed
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(repo), child_env.get("PYTHONPATH", "")) if p
    )
    with open(log_path, "ab") as log_file:
        log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            start_new_session=True,
        )
    log.info("started the Memory service (pid %d) at %s, data in %s", process.pid, url, data)
    try:
        handle = _wait_healthy(process, url, token, startup_timeout, log_path)
        yield handle
    finally:
        _stop(process, stop_timeout)
        log.info("stopped the Memory service (pid %d)", process.pid)


def _wait_healthy(
    process: subprocess.Popen[bytes], url: str, token: str | None, timeout: float, log_path: Path
) -> MemoryServiceHandle:
    deadline = time.monotonic() + timeout
    while True:
        status = _health(url, token, timeout=1.0)
        if status == 200 and process.poll() is None:
            return MemoryServiceHandle(
                url, started=True, healthy=True, pid=process.pid, log_path=log_path
            )
        if process.poll() is not None:
            # Someone else may have started one on this port at the same moment: use theirs.
            if _health(url, token, timeout=1.0) == 200:
                log.info("another process started the Memory service at %s; using it", url)
                return MemoryServiceHandle(url, started=False, healthy=True)
            raise MemoryServiceError(
                f"the Memory service exited with status {process.returncode} while starting "
                f"at {url}",
                log_path,
            )
        if status is not None and status != 200:
            _check_answer(url, status)
        if time.monotonic() > deadline:
            raise MemoryServiceError(
                f"the Memory service did not answer at {url} within {timeout:.0f} s", log_path
            )
        time.sleep(0.1)


@contextmanager
def memory_session(
    config: Any,
    *,
    run_dir: str | Path | None = None,
    enabled: bool | None = None,
    data_dir: str | Path | None = None,
) -> Iterator[Any]:
    """A MemoryClient for a training run, or None when ``memory.enabled`` is off.

    Starts the service if none answers (``memory.autostart``), builds the client from the
    ``memory`` section of ``config`` (writes queued during an outage go to
    ``RUN_DIR/memory-outbox``, so a resumed run delivers them), and at the end delivers what is
    queued (up to ``memory.flush_timeout`` seconds) before a service started here is stopped.
    ``enabled`` overrides ``memory.enabled`` (the CLI's ``--memory``).
    """
    from agent.memory_client import MemoryClient

    memory = config.memory
    if not (memory.enabled if enabled is None else enabled):
        yield None
        return
    with ensure_memory_service(
        memory.base_url,
        data_dir if data_dir is not None else memory.data_dir,
        autostart=memory.autostart,
    ):
        outbox = Path(run_dir) / "memory-outbox" if run_dir is not None else None
        client = MemoryClient.from_config(config, outbox_dir=outbox)
        try:
            yield client
        finally:
            client.shutdown()  # logs what stays undelivered, and where
            if outbox is not None:
                with contextlib.suppress(OSError):
                    outbox.rmdir()  # only if empty: nothing left to deliver or to look at
