"""attnlab installed from a wheel, not run from the checkout: the bundled corpora travel with it.

A slow test (``make test-all``): it builds the wheel, installs it with its dependencies into a
fresh virtual environment (torch==2.13.0 first, the CPU build on this disk, as the Makefile does)
and trains the tiny preset for a few steps from a folder outside the checkout, with a private
cache folder, then scores the run on a bundled test set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_installed_wheel_carries_the_corpora_and_trains(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
        str(REPO))
    (wheel,) = (tmp_path / "dist").glob("attnlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "attnlab/data/bundled/multi30k/train.de.gz" in names
    assert "attnlab/data/bundled/tinyshakespeare/input.txt" in names
    # the kernels' sources, built on first use
    for source in ("short_attention.c", "beam_scores.c", "decode_attention.c", "vec8.h"):
        assert f"attnlab/nn/csrc/{source}" in names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    pip = str(venv / "bin" / "pip")
    run(pip, "install", "-q", "torch==2.13.0")
    run(pip, "install", "-q", str(wheel))

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATTNLAB_DATA", "RANK", "WORLD_SIZE")}
    env["ATTNLAB_CACHE"] = str(tmp_path / "cache")
    attnlab = str(venv / "bin" / "attnlab")
    located = run(str(venv / "bin" / "python"), "-c", "import attnlab; print(attnlab.__file__)", cwd=work, env=env)
    assert str(venv) in located.stdout  # the installed copy, not the checkout
    trained = run(attnlab, "train", "--preset", "tiny", "--out", "run", "--max-steps", "3", "--eval-every", "3",
                  "--eval-sentences", "5", "--average-last", "0", "--no-progress", cwd=work, env=env)
    assert "summary:" in trained.stdout
    assert any((tmp_path / "cache" / "prepared").iterdir())  # Multi30k prepared into the private cache
    assert list((tmp_path / "cache" / "native").glob("kernels-*.so"))  # and the kernels built there
    assert "could not build" not in trained.stderr
    scored = run(attnlab, "evaluate", "--checkpoint", "run", "--limit", "5", "--beam", "1", cwd=work, env=env)
    assert "BLEU (cased)" in scored.stdout and "chrF2++" in scored.stdout
