#!/usr/bin/env python3
"""kvmweb's entry points against plain `virsh migrate`, same lab VM, same bandwidth cap.

Each round migrates the VM once per side, back and forth between lab-a and lab-b, the
order rotating from round to round (interleaved: the machine's load hits every side):

- virsh: the wall time of `virsh migrate --live --p2p --persistent --undefinesource
  [--bandwidth N]`.
- cli: the wall time of `manage.py migrate_vm VM TARGET --mode live [--bandwidth N]
  --ack-all --wait`, process start to exit, as its user waits for it; served by
  `manage.py cli_server` (started here, as scripts/run.sh does).
- cli_local (--cli-local): the same with KVMWEB_CLI_SERVER=0 (Python and Django start-up
  in the command's process).
- wizard: Chromium (Playwright) on a real daphne (`python -m kvmweb.serve`) and the
  migrations worker: the wizard's checklist page for the VM and target is opened (not
  timed: the user reads it), warnings acknowledged, then the clock runs from the click on
  the confirm button to the job page showing "succeeded". Both ends are read in the page,
  on the browser's clock: the click event's time stamp, and the first animation frame
  after the status element turned "succeeded" (a MutationObserver). Playwright's own
  view (before its click to after its wait returned) is printed too ("playwright"): it
  adds its actionability checks before the click (~30-45 ms) and its polling after the
  change (~30-350 ms), which nobody clicking a real browser waits for.
- kvmweb (--job): in-process do_create_job to the job row recorded succeeded, through the
  worker, with where the time goes (pickup, claim to call, call end to recorded).

Prints every round, the load average, per side the median and the median of the per-round
ratios to virsh, per side kvmweb's own time (wall time minus libvirt's migrate call, which
varies by up to a second between rounds on a loaded machine), flags a side that completed
nothing, and ends with one JSON line:
{"ratio": {"cli": ..., "wizard": ...}, ...}. Goal: ratios <= 1.10.

Run as root with the lab available: .venv/bin/python benchmarks/migrate_vs_virsh.py
[--quick] [--pairs 6] [--bandwidth 16] [--memory 128]; --bandwidth 0 runs every side
uncapped. --quick: 3 rounds (within 5 minutes). Uses a throwaway SQLite database and data
dir; creates and removes its own guest; stops every process it started by its PID.
"""

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labbench  # noqa: E402

TMP = labbench.setup("kvmweb-bench-migrate-")
ROOT = labbench.ROOT

import lab  # noqa: E402
from hosts import services as host_services  # noqa: E402
from hosts.models import VM, Host  # noqa: E402
from migrations_app.models import MigrationJob  # noqa: E402
from migrations_app.plan import MigrationPlan  # noqa: E402
from migrations_app.preflight import run_preflight  # noqa: E402
from migrations_app.services import do_create_job  # noqa: E402


def run_kvmweb(user, name, target, bandwidth):
    vm = VM.objects.get(name=name, gone=False)
    options = {"bandwidth": bandwidth} if bandwidth else {}
    plan = MigrationPlan(vm, vm.host, target, "live", dict(options))
    report = run_preflight(plan)  # the wizard's step 4 (not timed: the user reads it)
    acks = [r.id for r in report.warnings]
    t0 = time.monotonic()
    # The confirm POST: the wizard hands over the report the user just read (views._seen_report).
    job = do_create_job(vm, target, "live", dict(options), actor=user, report=report, acknowledged=acks)
    while True:
        status = MigrationJob.objects.filter(pk=job.pk).values_list("status", flat=True).get()
        if status not in MigrationJob.ACTIVE_STATES:
            break
        time.sleep(0.005)
    wall = time.monotonic() - t0
    job.refresh_from_db()
    if job.status != MigrationJob.SUCCEEDED:
        raise SystemExit(f"kvmweb job #{job.pk} ended {job.status}: {job.error}")
    events = {e.message.split(":")[0].split(" (")[0]: e.at for e in job.events.all()}
    pickup = (job.started_at - job.created_at).total_seconds()
    started = next((at for msg, at in events.items() if msg.startswith("Migration started")), None)
    preflight = (started - job.started_at).total_seconds() if started else None
    migration = (job.elapsed_ms or 0) / 1000
    timing = job.result.get("timing_ms", {})
    detail = {"pickup": pickup, "worker_preflight": preflight, "libvirt_elapsed": migration, "job": job.pk}
    detail["claim_to_call"] = timing.get("migrate_start", 0) / 1000
    detail["conclude"] = (timing.get("concluded", 0) - timing.get("migrate_end", 0)) / 1000
    detail["migrate_call"] = (timing.get("migrate_end", 0) - timing.get("migrate_start", 0)) / 1000
    detail["after_call"] = wall - pickup - timing.get("migrate_end", 0) / 1000
    return wall, detail


def last_job_marks(clicked=None, shown=None):
    """Where the newest job's time went (ms): created to claimed (queue pickup), claim to
    the checklist done (the worker's re-check; ~0 when the command's own stood in), claim
    to the libvirt call, the call, the call's end to concluded. With the wizard's click and
    "succeeded" shown (epoch seconds): click to the job row ("post"), the job's end to
    shown ("shown")."""
    job = MigrationJob.objects.order_by("-pk").first()
    t = (job.result or {}).get("timing_ms", {}) if job else {}
    if not t:
        return {}
    post = {}
    if clicked is not None and shown is not None and job.finished_at:
        post["post"] = round((job.created_at.timestamp() - clicked) * 1000)
    return {
        **post,
        "pickup": round((job.started_at - job.created_at).total_seconds() * 1000),
        "recheck": t.get("preflight_done", 0),
        "checklist": (job.preflight or {}).get("duration_ms", 0),  # the stored report's own run
        "to_call": t.get("migrate_start", 0),
        "call": t.get("migrate_end", 0) - t.get("migrate_start", 0),
        "conclude": t.get("concluded", 0) - t.get("migrate_end", 0),
        **({"shown": round((shown - job.finished_at.timestamp()) * 1000)} if post else {}),
    }


def child_env(**extra):
    """os.environ for a process started here (without the benchmark's own switch)."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(extra)
    return env


def run_cli(user, name, target, bandwidth, extra=(), local=False):
    """`manage.py migrate_vm NAME TARGET --mode live --bandwidth N --ack-all --wait`: the wall
    time of the process, start to exit (start-up, checklist, job, migration, conclusion,
    exit), as a user of the command waits for it. ``local``: without the cli_server."""
    cmd = [sys.executable, "manage.py", "migrate_vm", name, target.name, "--mode", "live"]
    cmd += ["--bandwidth", str(bandwidth)] if bandwidth else []
    cmd += ["--user", user.username, "--ack-all", "--wait", *extra]
    env = child_env(KVMWEB_CLI_TIMING=repr(time.time()), **({"KVMWEB_CLI_SERVER": "0"} if local else {}))
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"migrate_vm failed ({r.returncode}): {r.stdout.strip()} {r.stderr.strip()}")
    times = {}
    for line in r.stderr.splitlines():  # KVMWEB_CLI_TIMING: "timing <label> <seconds since start>"
        if line.startswith("timing "):
            _t, label, at = line.split()
            times[label] = float(at)
    return wall, times


def run_virsh(name, source, target, bandwidth):
    return labbench.virsh_migrate(name, source, target, bandwidth)


PASSWORD = secrets.token_hex(12)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
]


def start_process(args, log_name, **env):
    log = open(TMP / log_name, "a")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        args, cwd=ROOT, env=child_env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_process(proc):
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server():
    """`manage.py cli_server` as scripts/run.sh starts it; returns once it listens."""
    from migrations_app.cliclient import socket_path

    proc = start_process([sys.executable, "manage.py", "cli_server"], "cli_server.log")
    path = str(socket_path())

    def listens():
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return True
        except OSError:
            return False

    wait_for("cli_server", listens, proc)
    return proc


def wait_for(what, ready, proc, timeout=120):
    """Poll ``ready()`` until true (generous limit: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up (see {TMP})")
        time.sleep(0.05)


# In every page: the confirm click's time stamp (kept across the redirect to the job
# page) and the animation frame after the job status first shows "succeeded", both in
# epoch milliseconds on the browser's clock.
PAGE_CLOCK = """
(() => {
  document.addEventListener("click", (e) => {
    if (e.target.closest && e.target.closest("[data-testid=wizard-start]"))
      sessionStorage.setItem("kvmwebBenchClick", String(performance.timeOrigin + e.timeStamp));
  }, true);
  new MutationObserver((_m, observer) => {
    const el = document.querySelector("[data-testid=job-status]");
    if (el && el.classList.contains("succeeded")) {
      observer.disconnect();
      requestAnimationFrame(() => { window.kvmwebBenchShown = performance.timeOrigin + performance.now(); });
    }
  }).observe(document, {subtree: true, childList: true, attributes: true});
})();
"""


class Wizard:
    """daphne + Chromium signed in as the benchmark's operator."""

    def __init__(self, user):
        user.set_password(PASSWORD)
        user.save()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.web = start_process(
            [
                sys.executable,
                "-m",
                "kvmweb.serve",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "kvmweb.asgi:application",
            ],
            "daphne.log",
            KVMWEB_ALLOWED_HOSTS="127.0.0.1",
        )

        def accepts():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for("daphne", accepts, self.web)
        from playwright.sync_api import sync_playwright

        # Playwright's sync API keeps an event loop on this thread; the benchmark's own ORM
        # calls (between rounds) are plain synchronous code.
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "1"
        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page()
        self.page.add_init_script(PAGE_CLOCK)
        self.page.goto(f"{self.url}/login/")
        self.page.fill("input[name=username]", user.username)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(f"{self.url}/")

    def migrate(self, name, target, bandwidth):
        """The checklist page (not timed), then click → "succeeded" shown."""
        vm = VM.objects.get(name=name, gone=False)
        query = f"vm={vm.pk}&target={target.pk}&step=preflight&mode=live"
        query += f"&bandwidth={bandwidth}" if bandwidth else ""
        page = self.page
        page.goto(f"{self.url}/migrations/new/?{query}")
        page.wait_for_selector("[data-testid=wizard-start]", timeout=120000)
        for box in page.locator("input[name=ack]").all():
            box.check()
        page.evaluate("() => sessionStorage.removeItem('kvmwebBenchClick')")
        t0 = time.monotonic()
        page.click("[data-testid=wizard-start]")
        try:
            page.wait_for_selector(
                "[data-testid=job-status].succeeded, [data-testid=job-status].failed, "
                "[data-testid=job-status].cancelled",
                timeout=300000,
            )
        except Exception as exc:
            raise SystemExit(f"wizard: no final state shown: {exc}") from None
        self.playwright = time.monotonic() - t0
        status = page.inner_text("[data-testid=job-status]")
        if status != "succeeded":
            raise SystemExit(f"wizard job ended {status}: {page.url}")
        page.wait_for_function("() => window.kvmwebBenchShown", timeout=60000)
        clicked, shown = page.evaluate(
            "() => [Number(sessionStorage.getItem('kvmwebBenchClick')), window.kvmwebBenchShown]"
        )
        if not clicked:
            raise SystemExit("wizard: the page recorded no click on the confirm button")
        self.clicked, self.shown = clicked / 1000, shown / 1000
        return self.shown - self.clicked

    def close(self):
        for step in (self.browser.close, self.pw.stop):
            try:
                step()
            except Exception:
                pass
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        stop_process(self.web)


SIDES = ("virsh", "cli", "cli_local", "wizard", "kvmweb")
LABELS = {
    "cli": "migrate_vm --wait process (cli_server)",
    "cli_local": "migrate_vm --wait process (no cli_server)",
    "wizard": "wizard confirm click to 'succeeded' shown",
    "kvmweb": "job created to recorded (in-process submit)",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6, help="rounds")
    ap.add_argument("--bandwidth", type=int, default=16)
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="3 rounds (within 5 minutes)")
    ap.add_argument(
        "--cli-quick", action="store_true", help="run migrate_vm with --quick (no dirty-rate measurement)"
    )
    ap.add_argument("--cli-local", action="store_true", help="also migrate_vm without the cli_server")
    ap.add_argument("--no-wizard", action="store_true", help="leave out the browser side")
    ap.add_argument("--job", action="store_true", help="also the in-process job side")
    ap.add_argument(
        "--cpu", action="store_true", help="print the CPU each side cost the machine, by process (group)"
    )
    ap.add_argument("--no-job", action="store_true", help=argparse.SUPPRESS)  # the default now
    args = ap.parse_args()
    if args.quick:
        args.pairs = min(args.pairs, 3)
    sides = ["virsh", "cli"]
    sides += ["cli_local"] if args.cli_local else []
    sides += [] if args.no_wizard else ["wizard"]
    sides += ["kvmweb"] if args.job else []
    t_start = time.monotonic()
    load_start = os.getloadavg()
    print(f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)

    started = lab.up(2)
    user, hosts = labbench.kvmweb(("lab-a", "lab-b"))
    name = f"bench-mig-{secrets.token_hex(3)}"
    worker = server = wizard = None
    rows = []
    failures = {side: 0 for side in sides}
    cli_extra = ("--quick",) if args.cli_quick else ()
    try:
        lab.create_guest(name, host="lab-a", storage="shared", memory_mib=args.memory)
        lab.wait_counter_moves("lab-a", name)
        worker = labbench.start_worker()
        server = start_cli_server()
        for h in hosts.values():
            host_services.do_sync_inventory(h)
        if "wizard" in sides:
            wizard = Wizard(user)
        where = "lab-a"
        for i in range(args.pairs):
            order = sides[i % len(sides) :] + sides[: i % len(sides)]  # rotate who goes first
            pair = {}
            for side in order:
                other = "lab-b" if where == "lab-a" else "lab-a"
                target = Host.objects.get(name=other)
                if args.cpu:
                    groups = {os.getpgid(0): "bench"}
                    for label, proc in (("worker", worker), ("cli_server", server)):
                        groups[proc.pid] = label
                    if wizard is not None:
                        groups[wizard.web.pid] = "daphne"
                    cpu_before = labbench.cpu_by_group(groups)
                try:
                    if side == "kvmweb":
                        pair["kvmweb"], pair["detail"] = run_kvmweb(user, name, target, args.bandwidth)
                    elif side in ("cli", "cli_local"):
                        pair[side], pair[f"{side}_times"] = run_cli(
                            user, name, target, args.bandwidth, cli_extra, local=side == "cli_local"
                        )
                        pair[f"{side}_marks"] = last_job_marks()
                    elif side == "wizard":
                        pair["wizard"] = wizard.migrate(name, target, args.bandwidth)
                        pair["wizard_marks"] = last_job_marks(wizard.clicked, wizard.shown)
                        pair["wizard_marks"]["playwright"] = round(wizard.playwright * 1000)
                    else:
                        pair["virsh"] = run_virsh(name, where, other, args.bandwidth)
                        for h in hosts.values():  # kvmweb must learn where virsh put it (not timed)
                            host_services.do_sync_inventory(h)
                except SystemExit as exc:  # report what the other rounds measured
                    print(f"round {i + 1} {side}: FAILED {exc}", flush=True)
                    failures[side] += 1
                    for h in hosts.values():
                        host_services.do_sync_inventory(h)
                    where = VM.objects.get(name=name, gone=False).host.name
                    continue
                if args.cpu:
                    used = labbench.cpu_delta(cpu_before, labbench.cpu_by_group(groups))
                    pair[f"{side}_cpu"] = {k: v for k, v in used.items() if v >= 0.01}
                where = other
                lab.wait_counter_moves(where, name)
            if "virsh" not in pair:
                continue
            for side in sides[1:]:
                if side in pair:
                    pair[f"ratio_{side}"] = pair[side] / pair["virsh"]
            rows.append(pair)
            line = f"round {i + 1}: virsh {pair['virsh']:.3f} s"
            for side in ("cli", "cli_local"):
                if side in pair:
                    t = pair[f"{side}_times"]
                    line += f"  {side} {pair[side]:.3f} s (ratio {pair[f'ratio_{side}']:.3f}"
                    line += "".join(f", {k} {v:.2f}" for k, v in t.items())
                    line += "".join(f", {k} {v} ms" for k, v in pair[f"{side}_marks"].items()) + ")"
            if "wizard" in pair:
                line += f"  wizard {pair['wizard']:.3f} s (ratio {pair['ratio_wizard']:.3f}"
                line += "".join(f", {k} {v} ms" for k, v in pair["wizard_marks"].items()) + ")"
            if "kvmweb" in pair:
                d = pair["detail"]
                line += (
                    f"  job {pair['kvmweb']:.3f} s (ratio {pair['ratio_kvmweb']:.3f}; pickup {d['pickup'] * 1000:.0f} ms,"
                    f" claim to call {d['claim_to_call'] * 1000:.0f} ms, migrate call {d['migrate_call']:.3f} s,"
                    f" call end to recorded {d['after_call'] * 1000:.0f} ms)"
                )
            print(line, flush=True)
            for side in sides:
                if f"{side}_cpu" in pair:
                    used = sorted(pair[f"{side}_cpu"].items(), key=lambda kv: -kv[1])
                    print(
                        f"  cpu {side}: {sum(v for _, v in used):.2f} s ("
                        + ", ".join(f"{k} {v:.2f}" for k, v in used)
                        + ")",
                        flush=True,
                    )
    finally:
        if wizard is not None:
            wizard.close()
        stop_process(server)
        labbench.stop_worker(worker)
        lab.remove_guest(name)
        if started:
            lab.down(hosts=started)
    med = statistics.median
    load = os.getloadavg()
    print()
    cap = f"--bandwidth {args.bandwidth} MiB/s" if args.bandwidth else "uncapped"
    print(f"live p2p, {args.memory} MiB guest, {cap}, {len(rows)} rounds, {time.monotonic() - t_start:.0f} s")
    print(f"load average at start {load_start[0]:.2f}, at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("failed runs: " + ", ".join(f"{k} {v}" for k, v in failures.items()))
    summary = {
        "bandwidth": args.bandwidth,
        "rounds": len(rows),
        "failures": failures,
        "load": round(load[0], 2),
    }
    summary["ratio"] = {}
    if not rows:
        print("NOTHING COMPLETED")
    else:
        summary["virsh_s"] = round(med(r["virsh"] for r in rows), 3)
        print(f"virsh median {summary['virsh_s']:.3f} s")
        for side in sides[1:]:
            got = [r for r in rows if side in r]
            if not got:
                print(f"{LABELS[side]}: COMPLETED NOTHING")
                summary["ratio"][side] = None
                continue
            ratios = [r[f"ratio_{side}"] for r in got]
            summary[f"{side}_s"] = round(med(r[side] for r in got), 3)
            summary["ratio"][side] = round(med(ratios), 3)
            print(
                f"{LABELS[side]}: median {summary[f'{side}_s']:.3f} s, median ratio to virsh {med(ratios):.3f}"
                f" (min {min(ratios):.3f}, max {max(ratios):.3f}; {len(got)} rounds; goal <= 1.10)"
            )
        # kvmweb's own time: the side's wall time minus libvirt's migrate call (its
        # migrateToURI3, which virsh makes too): less noisy than the ratio on a loaded
        # machine, where the call alone varied by a second between rounds.
        summary["own_s"] = {}
        for side in ("cli", "cli_local", "wizard"):
            own = [r[side] - r[f"{side}_marks"]["call"] / 1000 for r in rows if r.get(f"{side}_marks")]
            if own:
                summary["own_s"][side] = round(med(own), 3)
                print(
                    f"{side}: wall time minus the migrate call, median {med(own):.3f} s"
                    f" (min {min(own):.3f}, max {max(own):.3f})"
                )
        for side in ("cli", "cli_local"):
            times = [r[f"{side}_times"] for r in rows if r.get(f"{side}_times")]
            if times:
                parts = sorted(
                    {k for t in times for k in t}, key=lambda k: med(t[k] for t in times if k in t)
                )
                print(
                    f"{side} timeline (median s since process start): "
                    + ", ".join(f"{k} {med(t[k] for t in times if k in t):.2f}" for k in parts)
                )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
