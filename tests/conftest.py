from __future__ import annotations

import os
from pathlib import Path

import pytest

from segmenters.data import default_data_root

DATA_ROOT = default_data_root()


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data not present at {DATA_ROOT} (../shared/data beside the checkout, or $PATCHWATCH_DATA)")
    return DATA_ROOT


@pytest.fixture(autouse=True, scope="session")
def _quiet_matplotlib():
    os.environ.setdefault("MPLBACKEND", "Agg")
