#!/usr/bin/env python3
"""What the source probe (hosts/reach.py: migration ports + `virsh -c TARGET hostname` on
the source over SSH) costs the preflight: the quick checklist (no dirty-rate measurement)
for a running lab VM, lab-a -> lab-b, live mode, with the hosts registered

  * over SSH (qemu+libssh2, kvmweb's own key): the probe runs on lab-a over SSH;
    "cold" empties the probe cache before every run, "cached" reuses a clean result
    (KVMWEB_PORT_PROBE_CACHE_SECONDS), "no probe" replaces the probe by a constant answer
    (what the checklist costs without it, interleaved in the same loop);
  * over TCP: the probe connects from kvmweb's machine.

Each row is interleaved with the others run by run (the machine is shared: ratios from one
run, with the load average printed). Median / p95 / max over N runs (default 10).

Run (root; the lab is started if needed and torn down if this script started it):
    .venv/bin/python benchmarks/port_probe.py [--runs 10]
"""

import argparse
import os
import secrets
import time

import labbench  # noqa: E402

TMP = labbench.setup("kvmweb-bench-probe-")

from django.core.cache import cache  # noqa: E402
from django.core.management import call_command  # noqa: E402

import lab  # noqa: E402
from hosts import reach, services, transport  # noqa: E402
from hosts.models import VM, Host  # noqa: E402
from migrations_app import preflight  # noqa: E402
from migrations_app.plan import MigrationPlan  # noqa: E402

p95_of, stats = labbench.p95_of, labbench.stats


def register(kind):
    Host.objects.all().delete()
    out = {}
    for h in ("lab-a", "lab-b"):
        if kind == "ssh":
            uri = transport.build_uri("ssh", lab.ip(h))
            services.do_confirm_host_key(uri, transport._fingerprint(lab.ssh_host_key(h)))
        else:
            uri = lab.uri(h)
        out[h] = services.do_register_host(f"{h}-{kind}", uri)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    name = f"bench-probe-{secrets.token_hex(3)}"
    real_measure = reach.measure
    with lab.session(2):
        lab.require_ssh(["lab-a", "lab-b"])
        identity = transport.generate_ssh_key()
        lab.authorize_ssh_key(identity.public_key, ["lab-a", "lab-b"])
        try:
            uuid = lab.create_guest(name, host="lab-a", hot_mib=4)
            lab.wait_counter_moves("lab-a", name)
            rows = {}
            for kind in ("ssh", "tcp"):
                hosts = register(kind)
                vm = VM.objects.get(uuid=uuid)
                plan = MigrationPlan(vm=vm, source=hosts["lab-a"], target=hosts["lab-b"], mode="live")
                report = preflight.run_preflight(plan, measure_dirty_rate=False)  # warm-up
                r = report.result("migration_ports")
                print(f"{kind}: verdict {report.verdict}; migration_ports {r.status}: {r.message}")
                print(f"{kind}: transport: {report.result('transport').message[-160:]}")

                def constant(source, address, ports, **_kw):
                    return reach.Reach(
                        reach.KVMWEB, address, [reach.PortState(p, reach.CLOSED) for p in ports]
                    )

                variants = [
                    ("cold", True, real_measure),
                    ("cached", False, real_measure),
                    ("no probe", False, constant),
                ]
                for _ in range(args.runs):
                    for label, clear, fn in variants:
                        if clear:
                            cache.clear()
                        reach.measure = fn
                        try:
                            t0 = time.perf_counter()
                            preflight.run_preflight(plan, measure_dirty_rate=False)
                            rows.setdefault(f"{kind}, {label}", []).append((time.perf_counter() - t0) * 1000)
                        finally:
                            reach.measure = real_measure
            print(f"\nquick preflight lab-a -> lab-b, live, {args.runs} runs, interleaved")
            for label, samples in rows.items():
                print(f"{label:20s} {stats(samples)}")
            load = os.getloadavg()
            print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (goal: p95 <= 1000 ms)")
        finally:
            lab.remove_guest(name)


if __name__ == "__main__":
    main()
