"""The bundled Multi30k corpus as a prepared dataset, made on first use in the user's cache folder.

Training reads every translation corpus the same way: from a prepared dataset
(``attnlab.data.prepared``). A user's own corpus is prepared by ``attnlab prepare``; Multi30k, which
ships with attnlab, is prepared here the first time a preset needs it, into
``<cache>/prepared/multi30k-<src>-<tgt>-<settings hash>``, and found there afterwards (``prepare``
itself notices when the folder is up to date). The cache folder is ``$ATTNLAB_CACHE`` if set, else
the platform's user cache folder (``~/.cache/attnlab`` on Linux, via ``platformdirs``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from attnlab.folders import cache_dir

from .corpus import default_data_dir, multi30k_files
from .prepared import PreparedData, prepare

__all__ = ["cache_dir", "prepared_multi30k", "MULTI30K_TEST_SPLITS"]

MULTI30K_TEST_SPLITS = ("test_2016_flickr",)

# Multi30k is clean, aligned image captions: no pair is dropped for its length or length ratio
# (limits far beyond any caption), so the presets train on the same pairs as before the
# prepared-data path existed. Pairs too long for the model are left out at training time, by the
# model's own max_len.
_MULTI30K_MAX_LEN = 1024
_MULTI30K_MAX_RATIO = 1000.0


def prepared_multi30k(
    src_lang: str, tgt_lang: str, *, vocab_size: int, shared_vocab: bool,
    data_dir: str | os.PathLike[str] | None = None, progress: bool = False,
) -> PreparedData:
    """Multi30k ``src_lang``->``tgt_lang`` prepared with this vocabulary, from the cache or made now.

    The splits are ``train``, ``valid`` (Multi30k's ``val``) and ``test_2016_flickr``. The folder's
    name carries a hash of the settings and of the corpus folder, so that each combination has its
    own prepared copy; ``prepare`` re-checks the input files' sizes and hashes on every call.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    files = {split: multi30k_files(split, src_lang, tgt_lang, data_dir)[0] for split in
             ("train", "val", *MULTI30K_TEST_SPLITS)}
    prefixes = {split: str(path)[: -len(f".{src_lang}.gz")] for split, path in files.items()}
    settings = {"src": src_lang, "tgt": tgt_lang, "vocab_size": vocab_size, "shared": shared_vocab,
                "data": str(data_dir.resolve())}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "prepared" / f"multi30k-{src_lang}-{tgt_lang}-{key}"
    prepare(
        train=prefixes["train"], valid=prefixes["val"], out=out, src_lang=src_lang, tgt_lang=tgt_lang,
        tests={name: prefixes[name] for name in MULTI30K_TEST_SPLITS}, vocab_size=vocab_size,
        shared_vocab=shared_vocab, max_len=_MULTI30K_MAX_LEN, max_ratio=_MULTI30K_MAX_RATIO,
        progress=progress,
    )
    return PreparedData.open(out)
