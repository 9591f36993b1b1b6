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
    """Slow tests first: pytest-xdist's worksteal hands each worker a half of this order and lets
    an idle one take from the other's end, so with the minutes-long tests at the front the run ends
    on short ones (in file order, a 5-minute fuzz profile could start last and leave a worker idle
    that long). The long fuzz profile runs only when asked for by name (`-m fuzz`), even under
    `-m "not slow"`."""
    items.sort(key=lambda item: "slow" not in item.keywords)   # stable: file order within each kind
    if "fuzz" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="the long fuzz profile: run with -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)
