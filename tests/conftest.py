import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
