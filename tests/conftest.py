import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def emulated_library(tmp_path_factory):
    """The Metal kernels compiled for the CPU emulator, once per test session."""
    from metal_emulator import compile_library
    from torch_spatialnorm.mps import metal_source_path

    return compile_library(metal_source_path(), tmp_path_factory.mktemp("metal"))


@pytest.fixture
def generator(request):
    """A generator seeded per test from the test's name: fresh inputs for each test, reproducible."""
    seed = int.from_bytes(request.node.nodeid.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)
    return torch.Generator().manual_seed(seed)
