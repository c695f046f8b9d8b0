"""Devices that cannot migrate, UEFI variables and TPM state."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from migrations_app.preflight.registry import check, result
from migrations_app.preflight.registry import sentence as _sentence
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.report import FAIL, PASS, WARN


@check("devices", gettext_lazy("Migratable devices"), order=150)
def check_devices(ctx):
    """No device that cannot be migrated (mirror of libvirt's qemuMigrationSrcIsAllowed):
    host devices (PCI/USB/SCSI/mdev passthrough), vDPA, virtiofs, non-master shared
    memory, transient disks, invtsc without a fixed TSC frequency. Host-bound character
    devices, USB redirection and a display bound to a specific address are warnings."""
    g = ctx.guest()
    details = {
        "hostdevs": g["hostdevs"],
        "virtiofs": g["virtiofs"],
        "shmem": g["shmem"],
        "transient_disks": [d["dev"] for d in g["disks"] if d["transient"]],
        "invtsc_without_frequency": g["invtsc_without_frequency"],
        "redirdevs": g["redirdevs"],
        "host_char_devices": g["host_char_devices"],
        "graphics_listen": g["graphics_listen"],
    }
    blockers = []
    if g["hostdevs"]:
        blockers.append(
            _("%(n)d host device(s) passed through (%(t)s)")
            % {"n": len(g["hostdevs"]), "t": ", ".join(sorted({h["type"] for h in g["hostdevs"]}))}
        )
    if g["virtiofs"]:
        blockers.append(_("virtiofs shared folder(s)"))
    if g["shmem"]:
        blockers.append(_("shared memory device(s) %(n)s") % {"n": ", ".join(g["shmem"])})
    if details["transient_disks"]:
        blockers.append(_("transient disk(s) %(d)s") % {"d": ", ".join(details["transient_disks"])})
    if g["invtsc_without_frequency"]:
        blockers.append(_("the invtsc CPU feature without a fixed TSC frequency"))
    if blockers:
        live = ctx.strategy.live
        message = _("Cannot be migrated while running: %(b)s.") % {"b": "; ".join(blockers)}
        remedy = _(
            "Detach them (virsh %(c)s detach-device %(vm)s DEVICE.xml --live --config) and re-attach on the target, or use Cold."
        ) % {
            "c": _uri_flag(ctx.source),
            "vm": ctx.vm.name,
        }
        if not live:
            return result(
                WARN,
                message
                + " "
                + _(
                    "A cold or offline move is allowed, but the same devices must exist on the target to start it."
                ),
                _("Make sure the target has the same host devices, or remove them from the definition."),
                details,
            )
        return result(FAIL, message, remedy, details)
    warns = []
    if g["redirdevs"]:
        warns.append(
            _("%(n)d USB redirection device(s) (the client connection is lost)") % {"n": g["redirdevs"]}
        )
    if g["graphics_listen"]:
        warns.append(
            _(
                "the display listens on %(a)s, an address the target must also have (or QEMU fails to start there)"
            )
            % {"a": ", ".join(g["graphics_listen"])}
        )
    if g["host_char_devices"]:
        warns.append(
            _("host-bound character device(s) %(d)s (the same path must exist on the target)")
            % {"d": ", ".join(g["host_char_devices"])}
        )
    if warns:
        return result(WARN, _sentence("; ".join(warns)) + ".", _("Check these exist on the target."), details)
    return result(PASS, _("No passthrough or other non-migratable devices."), details=details)


@check("firmware", gettext_lazy("UEFI variables and TPM"), order=160)
def check_firmware(ctx):
    """UEFI variables (NVRAM file) and TPM state: offline migration copies neither;
    live migration carries the emulated TPM but needs the NVRAM file on the target."""
    g = ctx.guest()
    details = {"nvram": g["nvram"], "loader": g["loader"], "tpms": g["tpms"]}
    if not g["nvram"] and not g["tpms"]:
        return result(PASS, _("No UEFI variable store and no TPM to carry over."), details=details)
    problems, warns, notes = [], [], []
    if g["nvram"]:
        seen = ctx.storage("target").get(g["nvram"], {})
        details["nvram_visible_on_target"] = bool(seen.get("visible"))
        if seen.get("visible"):
            notes.append(_("UEFI variables %(p)s are on shared storage") % {"p": g["nvram"]})
        elif ctx.strategy.definition_only:
            problems.append(
                _(
                    "offline migration does not copy the UEFI variable store %(p)s; boot entries and Secure Boot keys would be lost"
                )
                % {"p": g["nvram"]}
            )
        elif ctx.strategy.shuts_down:
            warns.append(
                _("the UEFI variable store %(p)s is not on the target: it must be copied with the disks")
                % {"p": g["nvram"]}
            )
        else:
            warns.append(
                _(
                    "the UEFI variable store %(p)s is not on the target; libvirt re-creates it from the template, so variables changed since boot may be lost"
                )
                % {"p": g["nvram"]}
            )
    for tpm in g["tpms"]:
        if tpm["backend"] == "passthrough":
            problems.append(_("a host TPM is passed through; it cannot move"))
        elif tpm["backend"] == "emulator":
            if ctx.strategy.live:
                notes.append(_("the emulated TPM's state travels with the migration stream"))
            else:
                warns.append(
                    _(
                        "the emulated TPM's state (/var/lib/libvirt/swtpm/%(u)s) is not copied by a cold or offline move"
                    )
                    % {"u": ctx.vm.uuid}
                )
    remedy = _(
        "Copy the file(s) to the same path on %(t)s first (e.g. scp as root), or use Live migration."
    ) % {"t": ctx.target.name}
    if problems:
        text = "; ".join(problems + warns) + "."
        return result(FAIL, text[0].upper() + text[1:], remedy, details, overridable=True)
    if warns:
        text = "; ".join(warns) + "."
        return result(WARN, text[0].upper() + text[1:], remedy, details)
    text = "; ".join(notes) + "."
    return result(PASS, text[0].upper() + text[1:], details=details)


@check("guest_shutdown", gettext_lazy("Guest can be shut down"), order=200)
def check_guest_shutdown(ctx):
    """A cold move asks the guest to shut down (ACPI power button, or the guest agent):
    warn when the definition shows no sign of either, since such a guest usually ignores
    the request and the move then waits the whole timeout (and fails unless forced off)."""
    if not ctx.strategy.shuts_down:
        return result(PASS, _("Not needed: this mode does not shut the guest down."))
    dom = ctx.domain()
    if not dom["active"]:
        return result(PASS, _("The VM is already shut off: nothing to shut down."))
    root = ET.fromstring(dom["xml"])
    acpi = root.find("features/acpi") is not None
    agent = any(
        (ch.find("target") is not None and ch.find("target").get("name") == "org.qemu.guest_agent.0")
        for ch in root.findall("devices/channel")
    )
    details = {"acpi": acpi, "guest_agent_channel": agent}
    if acpi or agent:
        how = _("ACPI") if acpi else _("the guest agent channel")
        return result(
            PASS, _("The guest can be asked to shut down (%(how)s).") % {"how": how}, details=details
        )
    forced = bool(ctx.options.get("force_off"))
    return result(
        WARN,
        _(
            "The definition has no <acpi/> feature and no guest agent channel: the guest will probably "
            "ignore the shutdown request, and the move waits %(timeout)s s."
        )
        % {"timeout": ctx.options.get("shutdown_timeout", 120)}
        + (
            " " + _("Then it is forced off (as checked).")
            if forced
            else " " + _("Then it fails: the VM stays on the source.")
        ),
        _(
            "Check “Force off when the guest does not shut down”, shut the guest down yourself first, or use “Force off now” on the running job."
        ),
        details,
    )
