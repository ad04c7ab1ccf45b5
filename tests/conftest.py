import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    """HMTINY_FIXTURES, or ../shared/fixtures beside the repository."""
    return Path(os.environ.get("HMTINY_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    root = fixtures_root()
    if not root.exists():
        if "HMTINY_FIXTURES" in os.environ:
            pytest.fail(f"HMTINY_FIXTURES={root} does not exist")
        pytest.skip(f"parity fixtures not found at {root} (set HMTINY_FIXTURES)")
    return root


@pytest.fixture
def run_interpreted():
    """run(script, **env): run a test module as a script under Triton's CPU interpreter (TRITON_INTERPRET=1 must be
    set before triton is imported, hence the subprocess) and return the JSON its last output line prints."""
    def run(script, **env):
        full_env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), **env)
        proc = subprocess.run([sys.executable, str(script)], env=full_env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    """kernels.gemv keeps the tiles it times in ~/.cache: tests use a fresh file of their own."""
    monkeypatch.setenv("HMTINY_TILE_CACHE", str(tmp_path / "gemv_tiles.json"))
