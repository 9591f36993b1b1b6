import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def zoo_entries():
    from squeezer import zoo

    return zoo.ZOO
