"""The short soak: bench.soak for a few seconds (a site of 100 pages, more than the default
`states`, at 256 connections through nginx). It fails on any failed request, daemon error,
busy slot at stop, RSS growth beyond its bound or not levelling off, or descriptors that
keep growing."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.soak
def test_short_soak():
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--duration", "3", "--warmup",
                             "2", "--samples", "3"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 non-2xx, 0 socket errors" in result.stdout
    assert "levelled off" in result.stdout
