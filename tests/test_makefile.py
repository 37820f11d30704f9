"""The Makefile's set-up: the default installs exactly what CI installs; TORCH_INDEX and PIP_ARGS reach pip."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pip_lines(*assignments: str) -> list[str]:
    """The pip commands ``make`` would run to build .venv (dry run: nothing is installed)."""
    done = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), ".venv/.installed", *assignments],
                          capture_output=True, text=True, check=True)
    return [" ".join(line.split()) for line in done.stdout.splitlines() if " pip install " in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_default_setup_is_unchanged_and_the_index_is_passed_through():
    assert pip_lines() == [".venv/bin/python -m pip install -q --upgrade pip",
                           ".venv/bin/python -m pip install -q torch==2.13.0",
                           '.venv/bin/python -m pip install -q -e ".[all,dev]"']
    cpu = pip_lines("TORCH_INDEX=https://example.invalid/whl/cpu", "PIP_ARGS=--no-cache-dir")
    assert cpu == [".venv/bin/python -m pip install -q --no-cache-dir --upgrade pip",
                   ".venv/bin/python -m pip install -q --no-cache-dir --index-url https://example.invalid/whl/cpu torch==2.13.0",
                   '.venv/bin/python -m pip install -q --no-cache-dir -e ".[all,dev]"']  # the index is for torch only
