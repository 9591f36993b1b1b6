import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def zoo_entries():
    from squeezer import zoo

    return zoo.ZOO


def pytest_collection_modifyitems(config, items):
    """The long fuzz profile runs only when asked for by name (`-m fuzz`), even under `-m "not slow"`."""
    if "fuzz" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="the long fuzz profile: run with -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)
