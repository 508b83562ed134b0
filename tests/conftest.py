"""Loaded by pytest before any test module: the test process's own settings, made before PyTorch starts.

``OMP_WAIT_POLICY=PASSIVE`` (unless set): the attnlab command line sets the same default at its
entry point, and a test process is its own entry point. OpenMP reads the variable when PyTorch's
library loads, so it must be set before any test module imports torch: on this 2-core machine,
shared with a background training run, the end-to-end reversal test took 790 s with
OMP_WAIT_POLICY=ACTIVE against 19 s with PASSIVE. attnlab itself changes no environment variable.

``ATTNLAB_CACHE`` (unless set): a fresh folder for this test session, removed at its end, so the
Multi30k datasets that training tests prepare on first use are shared by the session's tests (and
its subprocesses) but never read from, or left in, the user's own cache.
Shared test helpers live in ``helpers.py``.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "ATTNLAB_CACHE" not in os.environ:
    os.environ["ATTNLAB_CACHE"] = tempfile.mkdtemp(prefix="attnlab-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ATTNLAB_CACHE"], True)


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="module")
def one_thread():
    """Decode on one thread for a test module (a busy 2-core machine made two threads far slower
    for small models); the session gets its own thread count back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
