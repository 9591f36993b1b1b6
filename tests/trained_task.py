"""A tiny conv + linear classification task and the compiled-vs-torch check shared by the tests of the
passes that train (tests/test_survey_sharing.py, test_survey_rank_hash.py, test_survey_vnq.py)."""

import torch
from torch import nn

import compiler


def tiny_task(n: int = 128):
    """(traced graph, x (n, 1, 8, 8), y (n,)): labels from a fixed random linear map of the inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = (x.reshape(n, -1) @ torch.randn(64, 10, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    return compiler.trace(model, (x[:1],)), x, y


def compiled_matches_torch(graph, x, rtol: float = 1e-4):
    """The compiled module of ``graph`` on ``x[:1]`` within ``rtol`` × max |torch output|."""
    import codegen

    with torch.no_grad():
        ref = graph.module.eval()(x[:1])
    out = torch.as_tensor(codegen.build(graph)(x[:1]))
    torch.testing.assert_close(out, ref, rtol=0, atol=rtol * float(ref.abs().max()))
