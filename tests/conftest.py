"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a module's in-process model runs, restored afterwards.

    The tiny model's ops take microseconds; on a small shared CPU a second thread that must wait for a
    core makes every op wait for a scheduler slice (measured: 10 to 40x slower when the machine is busy).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
