"""Run one benchmark step in a child process, so its peak memory (ru_maxrss) is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(script: str, *args: str) -> tuple[dict, int]:
    """`python SCRIPT --child ARGS...` must print one JSON document; returns it and peak RSS in bytes."""
    proc = subprocess.Popen([sys.executable, script, "--child", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "STASIS_LOG_LEVEL": "warning"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"benchmark step {args[0]} failed")
    return json.loads(out), usage.ru_maxrss * 1024
