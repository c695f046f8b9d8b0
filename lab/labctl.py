"""labctl: start, stop and inspect kvmweb's KVM lab (simulated libvirt hosts).

    python lab/labctl.py up [--hosts N]      start lab-a.. (idempotent; reuses a running lab)
    python lab/labctl.py down [--purge]      stop everything the lab started
    python lab/labctl.py status
    python lab/labctl.py guest NAME --host lab-a --storage shared|local [--shutoff]
    python lab/labctl.py rm-guest NAME
    python lab/labctl.py uri HOST [--transport tcp|tls|ssh] [--client client|client-expired|client-foreign]

Errors are one line on stderr and exit status 2 (no tracebacks).
"""

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `import lab` mean the package
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, _root)

import lab  # noqa: E402


def _cmd_up(args) -> None:
    t0 = time.monotonic()
    started = lab.up(args.hosts)
    lab.keep_running()  # a person asked for it: test sessions will not tear it down
    took = time.monotonic() - t0
    for name in lab.HOST_NAMES[: args.hosts]:
        verb = "started" if name in started else "running"
        print(f"{name}: {verb}  {lab.uri(name)}  ({lab.fqdn(name)})")
    print(
        f"lab up in {took:.2f} s ({len(started)} started, {args.hosts - len(started)} reused); dir {lab.LAB_DIR}"
    )
    print(f"try: virsh -c {lab.uri('lab-a')} list --all")


def _cmd_down(args) -> None:
    stopped = lab.down(purge=args.purge)
    print(
        f"lab down: stopped {', '.join(stopped) if stopped else 'nothing (not running)'}"
        + (f"; purged {lab.LAB_DIR}" if args.purge else "")
    )


def _cmd_status(args) -> None:
    st = lab.status()
    sh = st["shared"]
    mounted = "healthy" if sh["healthy"] else ("STALE" if sh["mounted"] else "not mounted")
    print(f"lab dir {st['lab_dir']}  shared storage: {mounted}  virt: {st['virt'] or 'not probed yet'}")
    owner = (
        f"started by tests (last session out stops {', '.join(st['auto_started'])})"
        if st["auto_started"]
        else "kept running (labctl up / make demo)"
    )
    if any(h["running"] for h in st["hosts"]):
        print(f"test sessions using it: {st['sessions']}; {owner}")
    if not st["hosts"]:
        print("no lab hosts")
    for h in st["hosts"]:
        state = f"running (tini {h['tini_pid']}, libvirtd {h['libvirtd_pid']})" if h["running"] else "stopped"
        print(f"{h['name']}: {state}  {h['uri']}  uuid {h['host_uuid']}")
        for g in h["guests"]:
            print(f"    {g['name']:<24} {g['state']:<9} {g['uuid']}")
        if h.get("error"):
            print(f"    error: {h['error']}")


def _cmd_guest(args) -> None:
    uuid = lab.create_guest(args.name, host=args.host, storage=args.storage, running=not args.shutoff)
    state = "defined (shut off)" if args.shutoff else "running"
    print(f"{args.name}: {state} on {args.host}, {args.storage} storage, uuid {uuid}")


def _cmd_rm_guest(args) -> None:
    lab.remove_guest(args.name)
    print(f"{args.name}: removed")


def _cmd_uri(args) -> None:
    print(lab.uri(args.host, args.transport, args.client))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="labctl", description="kvmweb KVM lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="start lab hosts (idempotent)")
    p.add_argument("--hosts", type=int, default=2, choices=range(1, len(lab.HOST_NAMES) + 1))
    p.set_defaults(func=_cmd_up)
    p = sub.add_parser("down", help="stop the lab")
    p.add_argument("--purge", action="store_true", help=f"also delete {lab.LAB_DIR}")
    p.set_defaults(func=_cmd_down)
    sub.add_parser("status", help="show lab hosts and guests").set_defaults(func=_cmd_status)
    p = sub.add_parser("guest", help="create a dirtier guest")
    p.add_argument("name")
    p.add_argument("--host", default="lab-a", choices=lab.HOST_NAMES)
    p.add_argument("--storage", default="shared", choices=["shared", "local"])
    p.add_argument("--shutoff", action="store_true", help="define it without starting it")
    p.set_defaults(func=_cmd_guest)
    p = sub.add_parser("rm-guest", help="remove a guest and its disks everywhere")
    p.add_argument("name")
    p.set_defaults(func=_cmd_rm_guest)
    p = sub.add_parser("uri", help="print a URI that works with `virsh -c`")
    p.add_argument("host", choices=lab.HOST_NAMES)
    p.add_argument("--transport", default="tcp", choices=lab.TRANSPORTS)
    p.add_argument(
        "--client", default="client", choices=lab.CLIENT_DIRS, help="TLS client certificate (the others fail)"
    )
    p.set_defaults(func=_cmd_uri)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except lab.LabError as e:
        print(f"labctl: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"labctl: error: {e} (run `make setup` to install libvirt-python)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `labctl status | head`
        return 0
    except KeyboardInterrupt:
        print("labctl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
