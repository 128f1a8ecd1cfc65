"""Shared fixtures: one local Ray for the session, paths to the real-format slide fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "openslide"

from tests.s3util import FAKE_ENV

# Keep Ray quiet and small on a 2-core CI machine; tests never reach a network.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray workers inherit the environment of the moment Ray starts: give them the fake S3
# credentials now (tests never talk to real AWS; endpoints are passed in configs).
for _k, _v in FAKE_ENV.items():
    os.environ[_k] = _v


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        raise RuntimeError(f"real-format slide fixtures missing at {FIXTURES}: they ship with the "
                           "repository (tests/fixtures/openslide/); restore them with git")
    return FIXTURES


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs) shared by the session; yields its address for subprocesses."""
    import ray

    # address="local": a new private Ray, never a cluster another process started here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


def pytest_collection_modifyitems(session, config, items):
    """Run ``cluster`` tests last: their fixture (tests/cluster.py) replaces the session's local
    Ray with a multi-node cluster, and no later test may find its Ray gone."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


from tests.cluster import autoscaling, multinode  # noqa: E402,F401 - `cluster` fixtures
