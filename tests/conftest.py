"""Shared fixtures. GPU tests carry the ``gpu`` marker; CI deselects them (``-m "not gpu"``).

CI runs the tests in two pytest-xdist workers (``-n 2``, README "Two commands"): each worker gets its
share of the cores as torch threads, and so do the processes its tests start (``OMP_NUM_THREADS``);
``slow`` tests are scheduled first, so that the long ones spread over the workers and the short ones
fill in behind them.
"""
import fcntl
import os

import pytest
import torch

#: pytest-xdist workers in this run (1 without xdist)
WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
#: torch threads per test process: CI has 2 cores; one each under two workers (more threads than
#: cores, or two processes of two threads on two cores, leave OpenMP spinning and run far slower)
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
if WORKERS > 1:  # subprocesses (CLI, torchrun, mp.spawn) start with torch's default otherwise
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory):
    """One ``data.synthetic.cache_dir`` for the whole run, all xdist workers included.

    Every xdist worker has a session of its own: the first one here generates the quick recipes'
    dataset under a lock, the others wait and reuse it (the generator is safe to run concurrently, but
    would do the work twice).
    """
    from swav_fast.config import load_config
    from swav_fast.run import synthetic_root

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    cache = root / "synthetic-cache"
    cache.mkdir(exist_ok=True)
    with open(root / "synthetic-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cfg = load_config("quick", [f"data.synthetic.cache_dir={cache}", "train.progress=false"])
            synthetic_root(cfg)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cache


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
    # slow tests first (a stable sort: same order in every xdist worker, as xdist requires)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
