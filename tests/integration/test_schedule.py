"""`lagent schedule` against a real Prefect server: served, then stopped the two ways a person
stops it (Ctrl-C, or SIGTERM from a process manager), leaving its schedule paused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_schedule_stops_cleanly_and_pauses_its_deployment(prefect_harness: str, tmp_path, stop) -> None:
    from prefect.client.orchestration import get_client

    name = f"test-{stop.name.lower()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "flows", "schedule", "--cron", "0 2 * * *", "--name", name, "--quick"],
        cwd=tmp_path,
        env={**os.environ, "PREFECT_API_URL": prefect_harness},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deployment = None
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 90
        while deployment is None or deployment.paused:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the deployment was never served"
            time.sleep(1)
            try:
                deployment = client.read_deployment_by_name(f"lagent-pipeline/{name}")
            except Exception:  # noqa: BLE001 - not registered yet
                deployment = None
        time.sleep(2)  # past start-up: the runner is polling for scheduled runs
        process.send_signal(stop)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output[-3000:]
        assert "never awaited" not in output and "Traceback" not in output, output[-3000:]
        assert f"the schedule of 'lagent-pipeline/{name}' is paused" in output
        assert client.read_deployment_by_name(f"lagent-pipeline/{name}").paused
