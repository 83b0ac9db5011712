import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def generator(request):
    """A generator seeded per test from the test's name: fresh inputs for each test, reproducible."""
    seed = int.from_bytes(request.node.nodeid.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)
    return torch.Generator().manual_seed(seed)
