"""Running an external program (llama.cpp's tools, the vendored converter): its failure is one line."""
from __future__ import annotations

import subprocess

from .console import log
from .errors import ToolError


def run_tool(command: list, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a tool; its failure is a ToolError (one line: the step, the exit code, the tool's last
    line of output)."""
    log(f"{what}: {' '.join(map(str, command[:3]))} ...")
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ToolError(f"{what} failed (exit {result.returncode}): {lines[-1].strip() if lines else 'no output'}")
    return result
