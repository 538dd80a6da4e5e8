"""The short soak: bench.soak for a few seconds (a site of 100 pages, more than the default
`states`, at 256 connections through nginx). It fails on any failed request, daemon error,
busy slot at stop, RSS growth beyond its bound or not levelling off, or descriptors that
keep growing."""

import subprocess
import sys

import pytest

from conftest import ROOT


# RSS grows in steps of up to about 5 MiB while glibc's arenas expand under a pool that makes
# some 300 states a second in each process (100 pages on 64 states): over three 1-second
# intervals one step decides whether the second half "grew". A 60-second soak levelled off
# at +7.2 MiB (+0.4 over its last 20 s); the soak's own default, 4 MiB, is for such runs.
SHORT_RUN_TAIL_MB = "8"


@pytest.mark.soak
def test_short_soak():
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--duration", "3", "--warmup",
                             "2", "--samples", "3", "--rss-tail-mb", SHORT_RUN_TAIL_MB],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 non-2xx, 0 socket errors" in result.stdout
    assert "levelled off" in result.stdout
