#!/usr/bin/env python3
"""Lab start benchmark: how long the KVM lab takes to come up, cold and reused.

Prints medians over --runs runs of:
  fresh     up(2) on an empty lab directory (config seeding, host UUIDs, pools)
  cold      up(2) on an existing, stopped lab directory (what `make lab-up` usually costs)
  reuse     up(2) when the lab already runs (what every test session after the first pays)
  down      down() of two idle hosts
  guest     create_guest + first counter tick (KVM: SeaBIOS boot dominates), remove_guest
  build     building dirtier.bin from source (as + ld)
  first     first guest on a fresh lab (build + KVM probe + boot)

Everything runs in a lab of its own (directory /var/tmp/kvmweb-lab-bench, addresses
127.0.9.2..), so the shared lab and whoever uses it are never touched.

Run as root: .venv/bin/python benchmarks/lab_start.py [--runs 5]
"""

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def show(label, values):
    values = [v for v in values if v is not None]
    if values:
        print(
            f"{label:<7} median {statistics.median(values):7.3f} s   "
            f"min {min(values):.3f}  max {max(values):.3f}  (n={len(values)})"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lab-dir", default="/var/tmp/kvmweb-lab-bench")
    ap.add_argument("--net", default="127.0.9", help="first three octets of the bench lab's addresses")
    args = ap.parse_args()

    os.environ["KVMWEB_LAB_DIR"] = args.lab_dir
    os.environ["KVMWEB_LAB_NET"] = args.net
    import lab

    if lab.skip_reason():
        sys.exit(f"lab_start: {lab.skip_reason()}")
    if any(lab.core._port_open(h) for h in lab.HOST_NAMES[:2]):
        sys.exit(f"lab_start: something already listens on {lab.ip('lab-a')}:16509; pick another --net")
    results = {k: [] for k in ("fresh", "cold", "reuse", "down", "guest", "build", "first")}
    try:
        for _ in range(args.runs):
            lab.down(purge=True)
            results["fresh"].append(timed(lambda: lab.up(2)))
            results["build"].append(timed(lab.guests.dirtier_bin))
            lab.guests.dirtier_bin().unlink()  # let `first` build it again

            def first():
                lab.create_guest("bench-first")
                lab.wait_counter_moves("lab-a", "bench-first")

            results["first"].append(timed(first))
            lab.remove_guest("bench-first")
            results["down"].append(timed(lambda: lab.down()))
            results["cold"].append(timed(lambda: lab.up(2)))
            results["reuse"].append(timed(lambda: lab.up(2)))

            def guest():
                lab.create_guest("bench-guest")
                lab.wait_counter_moves("lab-a", "bench-guest")
                lab.remove_guest("bench-guest")

            results["guest"].append(timed(guest))
            lab.down()
    finally:
        lab.down(purge=True)
        shutil.rmtree(args.lab_dir, ignore_errors=True)
    print(f"virt: {os.environ.get('KVMWEB_LAB_VIRT') or 'probed'}; runs: {args.runs}")
    for key, values in results.items():
        show(key, values)


if __name__ == "__main__":
    main()
