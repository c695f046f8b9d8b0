"""kvmweb.serve's scheduling hint for a busy management host (latency_slice)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/sched").exists(), reason="Linux only")
def test_it_asks_for_a_short_scheduler_slice_without_more_cpu_share():
    """kvmweb.serve's latency_slice: a shorter EEVDF slice (read back from /proc), same
    policy and nice value; 0 asks for nothing."""
    code = (
        "import os\n"
        "from kvmweb.serve import latency_slice\n"
        "nice = os.getpriority(os.PRIO_PROCESS, 0)\n"
        "assert latency_slice(0) is False\n"
        "took = latency_slice(700)\n"
        "line = [l for l in open('/proc/self/sched') if l.startswith('se.slice')]\n"
        "print(took, line[0].split(':')[1].strip() if line else '', os.sched_getscheduler(0) == os.SCHED_OTHER,"
        " os.getpriority(os.PRIO_PROCESS, 0) == nice)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    if out[0] == "False":
        pytest.skip("this kernel refuses a custom slice")
    assert out[1:] == ["700000", "True", "True"]
