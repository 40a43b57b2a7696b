"""Running podman, CRIU and friends as asyncio subprocesses with timeouts."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass

from stasis.errors import DeadlineExceeded, RuntimeFailure


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def tail(text: str, lines: int = 8) -> str:
    kept = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


# setpriv (util-linux) sets a death signal before it execs: prctl(PR_SET_PDEATHSIG) from Python would
# need preexec_fn, which is unsafe in a process with threads.
SETPRIV = shutil.which("setpriv")


async def run(argv: list[str], timeout: float = 120.0, check: bool = True,
              env: dict[str, str] | None = None, die_with_agent: bool = False) -> Result:
    """Run argv; on a non-zero exit raise RuntimeFailure carrying the tail of its stderr.
    `die_with_agent`: killed when this process dies, rather than finishing unseen."""
    wrapped = [SETPRIV, "--pdeathsig", "KILL", "--", *argv] if die_with_agent and SETPRIV else argv
    proc = await asyncio.create_subprocess_exec(
        *wrapped, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeadlineExceeded(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} did not finish within "
                               f"{timeout:.0f} s and was stopped") from None
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    result = Result(argv, proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise RuntimeFailure(f"{' '.join(argv[:3])} failed (exit {result.returncode}): {tail(result.stderr)}")
    return result
