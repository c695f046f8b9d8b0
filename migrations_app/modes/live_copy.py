"""Live with storage copy: a running VM on local disks; libvirt mirrors the disks to
volumes it pre-creates in the target's pool at the same directory, then copies memory
(virsh migrate --live --p2p --copy-storage-all)."""

import os

from hosts import hypervisor as hv
from migrations_app.jobrun import Failed, disk_paths, record_left_copies
from migrations_app.modes import register
from migrations_app.modes.live import Live


@register
class LiveCopy(Live):
    """Live plus NON_SHARED_DISK (or NON_SHARED_INC for an incremental copy)."""

    key = "live-copy"
    copies_disks = True

    def storage_flags(self, options):
        return ["non_shared_inc" if options.get("copy_storage") == "inc" else "non_shared_disk"]

    def storage_args(self, options):
        return ["--copy-storage-inc" if options.get("copy_storage") == "inc" else "--copy-storage-all"]

    def before_migrate(self, run):
        prepare_target_volumes(run)

    def success_extra(self, run):
        job = run.job
        if (job.options or {}).get("remove_source_disks"):
            return {"removed_source_disks": remove_source_disks(run)}
        # The source files stay, holding the data as of the move: recorded, so they are
        # never taken for shared storage and can be deleted from the VM page.
        record_left_copies(job, disk_paths(job.vm))
        return {}


def prepare_target_volumes(run):
    """Storage copy needs each disk's file to exist on the target, or an active pool
    whose target path is the disk's directory (libvirt then pre-creates the volume,
    see docs/architecture.md). Check that now rather than let libvirt fail halfway."""
    job = run.job
    try:
        with hv.session(job.target.uri) as dst:
            for path in disk_paths(job.vm):
                if dst.volume_at(path) is None and dst.pool_for_dir(os.path.dirname(path)) is None:
                    raise Failed(
                        (
                            "err_no_target_pool",
                            {
                                "target": job.target_name,
                                "dir": os.path.dirname(path),
                                "path": path,
                                "source": job.source_name,
                            },
                        )
                    )
    except hv.HypervisorError as exc:
        raise Failed(("err_target_volumes", {"host": job.target_name, "error": str(exc)})) from None
    run.event(("target_pools_ready", {}))


def remove_source_disks(run):
    """After a successful storage copy, and only when the user asked: delete the source
    copies libvirt leaves behind: it never deletes them itself)."""
    job = run.job
    removed = []
    try:
        with hv.session(job.source.uri) as src:
            for path in disk_paths(job.vm):
                if src.volume_at(path) is not None:
                    src.delete_volume(path)
                    removed.append(path)
    except hv.HypervisorError as exc:
        run.event(("remove_disks_failed", {"error": str(exc)}), "error")
    if removed:
        run.event(("removed_disks", {"host": job.source_name, "paths": ", ".join(removed)}))
    return removed
