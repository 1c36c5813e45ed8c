import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(fmt)``: the tiny synthesized LLaVA checkpoint in ``fmt`` ("awq", "qat", "fp16"), made
    once per test run and shared by every module (tests must not modify it: copy it first)."""
    from export_helpers import tiny_checkpoint as make

    return lambda fmt="awq": make(tmp_path_factory, fmt)


@pytest.fixture(scope="session")
def tiny_awq(tiny_checkpoint):
    return tiny_checkpoint("awq")
