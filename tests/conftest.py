import os
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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
