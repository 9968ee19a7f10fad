"""What every result file records about the run: the command that reproduces it and the software versions."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """``python -m <module> <arguments>`` as typed from the repository root (``argv`` None: ``sys.argv[1:]``);
    absolute paths among the arguments are shortened by :func:`portable_path`."""
    arguments = [portable_path(a) for a in (sys.argv[1:] if argv is None else argv)]
    return " ".join(["python -m", module, *(shlex.quote(a) for a in arguments)])


def portable_path(value: str | None) -> str | None:
    """``value`` as a result file may record it: relative paths as given, absolute ones by their last part only."""
    if value is None or not Path(value).expanduser().is_absolute():
        return value
    return f"<local>/{Path(value).name}"


def git_commit() -> str | None:
    """The checked-out commit of this repository, with ``+dirty`` when tracked files other than results differ; None
    outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"], cwd=REPO,
            capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Versions of Python and the libraries that determine the figures, the machine kind and the thread count."""
    import torch
    import transformers

    import switch_adapter

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "switch_adapter": switch_adapter.__version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
