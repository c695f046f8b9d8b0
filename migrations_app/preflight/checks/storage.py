"""Disks and storage (shared storage proved, left copies), snapshots and the disk cache mode."""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from migrations_app.preflight.registry import check, result
from migrations_app.preflight.registry import mib as _mib
from migrations_app.preflight.registry import sentence as _sentence
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.report import FAIL, PASS, WARN


@check("storage", gettext_lazy("Disks and storage"), order=120)
def check_storage(ctx):
    """Every disk is visible at the same path on the target (shared storage), or the
    plan copies it (live with storage copy, cold) into a target pool at the same
    directory with enough free space. Offline moves no disk at all. Secrets the disks
    use (LUKS passphrases, RBD/iSCSI credentials) must exist on the target."""
    g = ctx.guest()
    dom = ctx.domain()
    disks = [d for d in g["disks"] if d["path"] and d["kind"] in ("file", "block", "network", "volume")]
    details = {"disks": []}
    if not disks:
        return result(PASS, _("The VM has no disks with a source."), details=details)
    src = ctx.storage("source")
    dst = ctx.storage("target")
    problems, remedies, notes, warns = [], [], [], []
    to_copy, unverified = [], []
    for d in disks:
        row = {"dev": d["dev"], "path": d["path"], "kind": d["kind"], "device": d["device"]}
        details["disks"].append(row)
        if d["kind"] in ("network", "volume"):
            # Network disks (rbd, iscsi, gluster, nbd) are reachable from any host that has
            # the credentials; pool volumes are named per host and not verified here.
            row["shared"] = d["kind"] == "network"
            notes.append(
                _("disk %(dev)s is %(k)s storage (%(p)s), not checked by path")
                % {"dev": d["dev"], "k": d["kind"], "p": d["path"]}
            )
            continue
        s, t = src.get(d["path"], {}), dst.get(d["path"], {})
        sizes = dom["disk_sizes"].get(d["dev"], {})
        row.update(
            visible_on_target=bool(t.get("visible")),
            target_pool=t.get("pool"),
            source_pool=s.get("pool"),
            capacity=sizes.get("capacity") or s.get("capacity"),
            allocation=sizes.get("physical") or s.get("allocation"),
        )
        # A file at the same path proves nothing (it may be a copy an earlier move left
        # behind, with older data): only a probe volume seen from both hosts does.
        proof = ctx.shared_dirs().get(d["path"].rsplit("/", 1)[0]) if d["kind"] == "file" else None
        row["shared_proof"] = proof
        if t.get("visible") and proof is not True:
            row["shared"] = False
            left = ctx.left_copies.get(d["path"])
            if proof is None and ctx.strategy.live:
                warns.append(
                    _(
                        "kvmweb cannot prove that %(t)s sees the same file at %(p)s (no active storage pool at "
                        "its directory on both hosts); libvirt refuses the live migration if it does not"
                    )
                    % {"t": ctx.target.name, "p": d["path"]}
                )
                unverified.append(d["path"].rsplit("/", 1)[0])
                continue
            if proof is None:
                text = _(
                    "disk %(dev)s: %(t)s has a file at %(p)s, and kvmweb cannot prove it is the same file "
                    "(no active storage pool at its directory on both hosts)"
                )
            else:
                text = _(
                    "disk %(dev)s: %(t)s has a different file at %(p)s: that directory is not shared between "
                    "the hosts (proved with a probe file), so it is another copy, possibly with older data"
                )
            text = text % {"dev": d["dev"], "t": ctx.target.name, "p": d["path"]}
            if left is not None:
                text += " " + _("(a copy left on %(t)s by job #%(job)s on %(at)s)") % {
                    "t": ctx.target.name,
                    "job": left.job_id or "?",
                    "at": left.created_at.strftime("%Y-%m-%d %H:%M"),
                }
                row["left_copy"] = left.pk
            problems.append(text)
            remedies.append(
                _(
                    "delete that copy on %(t)s first (the VM page lists the copies kvmweb left behind and "
                    "deletes them), or rename it; kvmweb never boots a VM from a copy it cannot prove current"
                )
                % {"t": ctx.target.name}
            )
            continue
        same_file = bool(t.get("visible"))
        row["shared"] = same_file
        if same_file:
            if ctx.strategy.live and ctx.strategy.copies_disks:
                warns.append(
                    _(
                        "%(dev)s (%(p)s) is already on storage %(t)s sees; a full storage copy would copy it onto itself"
                    )
                    % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
                )
            continue
        if d["device"] == "cdrom" or d["readonly"]:
            problems.append(
                _("disk %(dev)s: the CD-ROM/read-only image %(p)s is not on %(t)s")
                % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
            )
            remedies.append(
                _(
                    "eject it (virsh change-media %(vm)s %(dev)s --eject) or copy the image to the same path on the target"
                )
                % {"vm": ctx.vm.name, "dev": d["dev"]}
            )
            continue
        if (
            not ctx.strategy.copies_disks
            and not s.get("visible")
            and not s.get("dir_pool")
            and not t.get("dir_pool")
        ):
            # No storage pool covers this directory on either host: libvirt cannot tell
            # whether the target sees the file (a plain NFS mount, say). Say so, don't guess.
            row["shared"] = None
            warns.append(
                _(
                    "disk %(dev)s (%(p)s) is in no libvirt storage pool on either host, so kvmweb cannot verify that %(t)s sees it"
                )
                % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
            )
            unverified.append(d["path"].rsplit("/", 1)[0])
            continue
        to_copy.append((d, row, t))
    if to_copy and not ctx.strategy.copies_disks:
        for d, _row, _t in to_copy:
            problems.append(
                _("disk %(dev)s (%(p)s) is on storage %(t)s cannot see")
                % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
            )
        if ctx.strategy.live:
            remedies.append(
                _(
                    "choose Live with storage copy (copies the disks while the VM runs), or move the disks to shared storage"
                )
            )
        else:
            remedies.append(
                _(
                    "offline migration moves only the definition: choose Cold (copies the disks), or move the disks to shared storage"
                )
            )
    elif to_copy:
        # live-copy and cold: a pool on the target at the disk's directory must take it.
        need_by_pool = {}
        for d, row, t in to_copy:
            pool = t.get("dir_pool")
            row["copy_to_pool"] = pool["name"] if pool else None
            if not pool:
                problems.append(
                    _("disk %(dev)s: %(t)s has no storage pool at %(dir)s to receive the copy")
                    % {"dev": d["dev"], "t": ctx.target.name, "dir": d["path"].rsplit("/", 1)[0]}
                )
                remedies.append(
                    _(
                        "create one: virsh %(c)s pool-define-as NAME dir --target %(dir)s; virsh %(c)s pool-start NAME"
                    )
                    % {"c": _uri_flag(ctx.target), "dir": d["path"].rsplit("/", 1)[0]}
                )
                continue
            if not pool["active"]:
                problems.append(
                    _("disk %(dev)s: pool %(p)s on %(t)s is not active")
                    % {"dev": d["dev"], "p": pool["name"], "t": ctx.target.name}
                )
                remedies.append(
                    _("virsh %(c)s pool-start %(p)s") % {"c": _uri_flag(ctx.target), "p": pool["name"]}
                )
                continue
            entry = need_by_pool.setdefault(
                pool["name"], {"available": pool["available"], "need": 0, "capacity": 0}
            )
            entry["need"] += row["allocation"] or row["capacity"] or 0
            entry["capacity"] += row["capacity"] or 0
        details["copy_pools"] = need_by_pool
        for name, entry in need_by_pool.items():
            if entry["available"] < entry["need"]:
                problems.append(
                    _("pool %(p)s on %(t)s has %(a)d MiB free; the copy needs %(n)d MiB")
                    % {
                        "p": name,
                        "t": ctx.target.name,
                        "a": _mib(entry["available"]),
                        "n": _mib(entry["need"]),
                    }
                )
                remedies.append(
                    _("free space in pool %(p)s on %(t)s or choose another target")
                    % {"p": name, "t": ctx.target.name}
                )
            elif entry["available"] < entry["capacity"]:
                warns.append(
                    _(
                        "pool %(p)s on %(t)s can hold today's data (%(n)d MiB) but not the disks' full size (%(c)d MiB)"
                    )
                    % {
                        "p": name,
                        "t": ctx.target.name,
                        "n": _mib(entry["need"]),
                        "c": _mib(entry["capacity"]),
                    }
                )
    details["copy"] = [row["dev"] for _d, row, _t in to_copy]
    if g["secrets"]:
        conn = ctx.need_conn("target")
        present = ctx.fact("secrets:target", lambda: conn.secrets_present(g["secrets"]))
        details["secrets_on_target"] = present
        for uuid in sorted(u for u, ok in present.items() if not ok):
            problems.append(
                _("secret %(u)s (disk passphrase or storage credentials) is missing on %(t)s")
                % {"u": uuid, "t": ctx.target.name}
            )
            remedies.append(
                _(
                    "define it there: virsh %(sc)s secret-dumpxml %(u)s > s.xml; virsh %(c)s secret-define s.xml; virsh %(c)s secret-set-value %(u)s --file VALUEFILE"
                )
                % {"u": uuid, "c": _uri_flag(ctx.target), "sc": _uri_flag(ctx.source)}
            )
    if problems:
        text = "; ".join(problems) + "."
        return result(FAIL, _sentence(text), _sentence("; ".join(remedies)) + ".", details)
    if warns:
        text = "; ".join(warns) + "."
        remedy = _("Acknowledge if intended.")
        if unverified:
            remedy = _(
                "Define a storage pool for %(dirs)s on both hosts (virsh pool-define-as NAME dir --target DIR; "
                "virsh pool-start NAME) so kvmweb can check, or acknowledge if you know the target sees it."
            ) % {"dirs": ", ".join(sorted(set(unverified)))}
        elif (
            ctx.strategy.live and ctx.strategy.copies_disks and any(r.get("shared") for r in details["disks"])
        ):
            remedy = _(
                "Use plain Live when every disk is shared; with mixed disks kvmweb copies only the disks listed under 'copy'."
            )
        return result(WARN, text[0].upper() + text[1:], remedy, details)
    if to_copy:
        msg = _("%(n)d disk(s) will be copied to %(t)s (%(d)s); the pools there have room.") % {
            "n": len(to_copy),
            "t": ctx.target.name,
            "d": ", ".join(row["dev"] for _d, row, _t in to_copy),
        }
    else:
        msg = _("Every disk is on storage %(t)s shares (proved with a probe file).") % {"t": ctx.target.name}
    if notes:
        msg += " " + "; ".join(notes) + "."
    return result(PASS, msg, details=details)


@check("snapshots", gettext_lazy("Snapshots"), order=140)
def check_snapshots(ctx):
    """No snapshot or checkpoint metadata: libvirt (9.0, seen on the lab) refuses to
    migrate a VM with either, live or offline; the metadata would not travel anyway."""
    dom = ctx.domain()
    details = {"snapshots": dom["snapshots"], "checkpoints": dom["checkpoints"]}
    c = _uri_flag(ctx.source)
    if dom["checkpoints"]:
        return result(
            FAIL,
            _("The VM has %(n)d checkpoint(s) (%(l)s); libvirt cannot migrate a VM with checkpoints.")
            % {"n": len(dom["checkpoints"]), "l": ", ".join(dom["checkpoints"])},
            _("Delete them (virsh %(c)s checkpoint-delete %(vm)s NAME --metadata) before migrating.")
            % {"c": c, "vm": ctx.vm.name},
            details,
        )
    if dom["snapshots"]:
        return result(
            FAIL,
            _(
                'The VM has %(n)d snapshot(s) (%(l)s); libvirt refuses to migrate it ("cannot migrate domain with snapshots"), in every mode.'
            )
            % {"n": len(dom["snapshots"]), "l": ", ".join(dom["snapshots"][:10])},
            _(
                "Keep what you need (virsh %(c)s snapshot-dumpxml %(vm)s NAME > NAME.xml, to re-create on the target "
                "with snapshot-create --redefine), then drop the metadata: virsh %(c)s snapshot-delete %(vm)s NAME --metadata"
            )
            % {"c": c, "vm": ctx.vm.name},
            details,
        )
    return result(PASS, _("No snapshots or checkpoints."), details=details)


@check("disk_cache", gettext_lazy("Disk cache mode"), order=170)
def check_disk_cache(ctx):
    """Writable disks use cache='none' or 'directsync' for a live move: with a host page
    cache the target may read stale data (libvirt refuses on non-cluster filesystems
    unless --unsafe). Cold and offline moves flush at shutdown."""
    g = ctx.guest()
    rows = [
        {"dev": d["dev"], "cache": d["cache"]}
        for d in g["disks"]
        if d["device"] == "disk" and not d["readonly"] and d["path"]
    ]
    details = {"disks": rows, "mode": ctx.mode}
    unsafe = [r for r in rows if r["cache"] not in ("none", "directsync")]
    if not unsafe:
        return result(PASS, _("Every writable disk uses cache='none' or 'directsync'."), details=details)
    if not ctx.strategy.live:
        return result(
            PASS,
            _("Cache modes (%(l)s) do not matter for a move of a shut-off VM.")
            % {"l": ", ".join(f"{r['dev']}={r['cache']}" for r in unsafe)},
            details=details,
        )
    listed = ", ".join(f"{r['dev']}: cache={r['cache']}" for r in unsafe)
    if ctx.strategy.copies_disks:
        return result(
            WARN,
            _(
                "Disk cache mode (%(l)s) keeps writes in the source's page cache; the copy mirrors them, but cache='none' is safer."
            )
            % {"l": listed},
            _("Set cache='none' on the disks (virsh edit, then restart the VM) when convenient."),
            details,
        )
    return result(
        WARN,
        _(
            "Unsafe disk cache mode for a live move (%(l)s): writes still in the source's page cache may not be seen by the target; libvirt refuses this on shared filesystems that are not cluster filesystems."
        )
        % {"l": listed},
        _(
            "Set cache='none' (or 'directsync') on the disk (virsh %(c)s edit %(vm)s: <driver ... cache='none'/>), restart the VM, then migrate."
        )
        % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
        details,
    )
