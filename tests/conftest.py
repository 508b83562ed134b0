"""Loaded by pytest before any test module: import attnlab first, so that its
``OMP_WAIT_POLICY=PASSIVE`` default is in the environment before PyTorch's OpenMP runtime starts.

Test modules import ``torch`` before ``attnlab`` (third-party imports first), which would otherwise
start OpenMP with spinning waits: on this 2-core machine, shared with a background training run,
the end-to-end reversal test took 790 s with OMP_WAIT_POLICY=ACTIVE against 19 s with PASSIVE.
Shared test helpers live in ``helpers.py``.
"""

import attnlab  # noqa: F401  (imported for its side effect on the environment)
