"""Shared, expensive parts of the integration tests: started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A temporary Prefect server (``prefect_test_harness``), shared by every test that runs a flow.

    Yields its API URL, for tests that start a command in a subprocess against it.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[str]:
    """One local Ray instance (2 CPUs) for every test that runs on Ray: starting one costs
    seconds and hundreds of MB. Yields its address, for commands started in a subprocess."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
