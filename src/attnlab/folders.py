"""attnlab's folder on the user's machine: the cache, shared by every layer that keeps files there
(prepared corpora in ``attnlab.data.cache``, the compiled kernels in ``attnlab.nn.native``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """attnlab's cache folder: ``$ATTNLAB_CACHE`` if set (read at each call), else the platform's
    user cache folder (``~/.cache/attnlab`` on Linux, via ``platformdirs``)."""
    configured = os.environ.get("ATTNLAB_CACHE")
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("attnlab", appauthor=False))
