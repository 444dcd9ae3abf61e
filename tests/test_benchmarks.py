"""The benchmark scripts still run: `benchmarks/bench_speed.py --quick` (tiny, a few steps, fresh subprocesses)
prints its table with a number in every measured column. Numbers are not asserted: speed lives in the script."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_bench_speed_quick_prints_a_table_of_numbers():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("tiny ")]
    runs = [" ".join(r[2:-6]) for r in rows]
    assert runs == ["sdlora", "sdlora --no-eval-loss", "floor fwd+bwd", "floor fwd"], p.stdout
    number = re.compile(r"\d+(\.\d+)?")
    for r, run in zip(rows, runs):
        steps, s_step, to_step1, rss, whole, after = r[-6:]
        assert all(number.fullmatch(x) for x in (steps, s_step, to_step1, rss, whole)), r
        assert float(s_step) > 0 and 100 < float(rss) < 10000 and float(whole) >= float(to_step1), r
        assert number.fullmatch(after) if run.startswith("sdlora") else after == "-", r
