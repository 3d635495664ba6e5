"""Shared pytest fixtures: where the recorded upstream outputs live, and a scratch base dir."""
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# The recorded upstream outputs sit beside the checkout: <parent>/shared/fixtures/nanochat
UPSTREAM_FIXTURES = Path(os.environ.get(
    "NANOCHAT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "nanochat"))


@pytest.fixture(scope="session")
def upstream_fixtures():
    """Path to ../shared/fixtures/nanochat (read-only). Fails loudly if it is missing."""
    if not (UPSTREAM_FIXTURES / "manifest.json").exists():
        pytest.fail(f"upstream fixtures not found at {UPSTREAM_FIXTURES}; "
                    f"set NANOCHAT_FIXTURES to the shared/fixtures/nanochat directory")
    return UPSTREAM_FIXTURES


@pytest.fixture
def fixture_base_dir(upstream_fixtures, tmp_path, monkeypatch):
    """A writable copy of the fixture dir, set as NANOCHAT_BASE_DIR for the test."""
    base = tmp_path / "base"
    shutil.copytree(upstream_fixtures, base)
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base
