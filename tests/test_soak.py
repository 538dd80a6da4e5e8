"""The short soak: bench/soak.py for a few seconds (256 connections through nginx). It fails
on any failed request, daemon error, busy slot at stop or RSS growth beyond its bound."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.soak
def test_short_soak():
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--duration", "3", "--warmup", "1"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 non-2xx, 0 socket errors" in result.stdout
