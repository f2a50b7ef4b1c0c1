"""Shared fixtures. Real data lives in ../shared/data (read-only, never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared(path: str) -> Path:
    full = SHARED_DATA / path
    if not full.exists():
        pytest.skip(f"real face data not found at {full} (the ../shared folder beside the checkout; CI has it)")
    return full


@pytest.fixture(scope="session")
def att_faces() -> Path:
    """ORL / AT&T faces: s1..s40, 10 grey 92x112 PGMs each."""
    return _shared("att_faces")


@pytest.fixture(scope="session")
def facenet_test_images() -> Path:
    """Four large colour portraits, one person each."""
    return _shared("facenet_test_images")


@pytest.fixture(scope="session")
def multiface_jpg() -> Path:
    """A group photo with several faces."""
    return _shared("multiface.jpg")
