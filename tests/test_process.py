"""The process settings of attnlab's programs (attnlab.app.process), each checked in a process of its own.

What keeping freed memory does to decoding is measured, not tested (page faults depend on the kernel:
this machine's proactive reclaim makes their count vary from run to run); see the module's docstring.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> list[str]:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("MALLOC_", "GLIBC_TUNABLES")) and k != "OMP_WAIT_POLICY"}
    environment.update(env, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keeping freed memory is a setting of glibc's malloc")
def test_freed_memory_is_kept_unless_the_user_set_malloc_up():
    code = "from attnlab.app.process import keep_freed_memory\nprint(keep_freed_memory())"
    assert _run(code) == ["True"]
    assert _run(code, MALLOC_TRIM_THRESHOLD_=str(128 << 10)) == ["False"]  # the user's setting stands
    assert _run(code, GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072") == ["False"]


def test_the_command_sets_them_before_torch_loads():
    # The entry point runs the defaults first (OMP_WAIT_POLICY must be set before torch loads), and a
    # user's OMP_WAIT_POLICY stands.
    code = ("import os, sys\nimport attnlab.app.process as process\ncalls = []\n"
            "process.keep_freed_memory = lambda: calls.append('kept') or True\n"
            "from attnlab.app import cli\n"
            "try:\n    cli.main(['plot', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ['OMP_WAIT_POLICY'], len(calls), 'torch' in sys.modules)")
    assert _run(code)[-3:] == ["PASSIVE", "1", "False"]
    assert _run(code, OMP_WAIT_POLICY="ACTIVE")[-3:] == ["ACTIVE", "1", "False"]
