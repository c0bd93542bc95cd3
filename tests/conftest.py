"""Shared fixtures. GPU tests carry the ``gpu`` marker; CI deselects them (``-m "not gpu"``)."""
import os

import pytest
import torch

# Tests run on 2 CPU cores in CI; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
