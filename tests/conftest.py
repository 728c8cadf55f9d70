"""Shared fixtures: the real data in ../shared (or $VLPCACHE_SHARED), skipped with a reason where absent."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLPCACHE_SHARED", REPO.parent / "shared")).resolve()

# tests (and the CLI subprocesses they start) use the offline weights in shared/models and never
# download weights: the tests of fetching lift this and point downloads at a server on 127.0.0.1
if (SHARED / "models").exists():
    os.environ.setdefault("VLPCACHE_MODELS", str(SHARED / "models"))
os.environ.setdefault("VLPCACHE_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _session_workspace(tmp_path_factory):
    """Module and session fixtures (which run before any test's own workspace is set) write here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLPCACHE_WORKSPACE", str(tmp_path_factory.mktemp("session-workspace") / ".vlpcache"))
        yield


@pytest.fixture(autouse=True)
def _own_workspace(tmp_path_factory, monkeypatch):
    """Every test has a workspace of its own: nothing a test or the commands it starts write by default
    (roots.json, caches, runs, indexes) reaches the user's `.vlpcache/` or another test's."""
    monkeypatch.setenv("VLPCACHE_WORKSPACE", str(tmp_path_factory.mktemp("workspace") / ".vlpcache"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set VLPCACHE_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _need(SHARED / "models")


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    return _need(SHARED / "data" / "videos")


@pytest.fixture(scope="session")
def msrvtt_dir() -> Path:
    return _need(SHARED / "data" / "msrvtt")


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    return _need(SHARED / "data" / "flickr8k")
