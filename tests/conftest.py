"""Shared fixtures. GPU tests carry the ``gpu`` marker; CI deselects them (``-m "not gpu"``)."""
import os

import pytest
import torch

# Tests run on 2 CPU cores in CI; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def caches_under_basetemp(tmp_path_factory):
    """torch.compile's and Triton's caches go under the session's temp folder (removed with it), not
    into /tmp/torchinductor_<user> where every test run would add to them; a cache dir set by the
    user is kept."""
    root = tmp_path_factory.mktemp("caches")
    for var, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ.setdefault(var, str(root / name))
    yield


@pytest.fixture
def fresh_dynamo():
    """Compile afresh: dynamo's per-function recompile limit counts TrainStep instances."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def exact_cuda():
    """No TF32, deterministic cuDNN: eager and captured steps then differ by rounding only."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = old


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
