import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/mechanism_checks.py


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and xdist runs 2 workers)
    torch.manual_seed(0)
    yield
