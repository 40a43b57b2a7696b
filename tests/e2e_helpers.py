"""Small helpers shared by the end-to-end test files."""

from __future__ import annotations

import uuid


def name(prefix: str) -> str:
    """A container name no other test uses (hosts are shared by a whole test session)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def one_error_line(stderr: str) -> str:
    """Errors are exactly one line (progress lines before it are fine), never a traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("stasis: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def log_lines(host, container: str) -> int:
    """Lines memhold appended to the file it keeps open in a directory it created after start."""
    return len(host.exec(container, "cat", "/data/new/log").split())
