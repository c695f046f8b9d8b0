"""What one viewer may see of hosts: the one place that masks host names and URIs.

Two rules, applied wherever a host is named outside the hosts' own scope check (job
rows, job pages, live fragments, VM history, exports, any API):

- A host outside the viewer's scope (``Host.objects.restrict(user)``) is shown as
  "another host", never by its name. A job in scope can name such a host: the current
  owner of a VM sees all of its past jobs, including moves from or to hosts they never
  had access to.
- libvirt URIs (and the host part of them) are for administrators only (whoever may
  change a host: ``hosts.change_host``); everyone else reads ``<host name>`` in their
  place, in virsh lines, preflight findings and libvirt error messages alike.

Use ``HostMask.for_user(user)`` and then ``mask.job(job)``, ``mask.event(event, job)``,
``mask.report(report, job)``, ``mask.host_text(host, text)``. Masked objects are
read-only views: saving one raises.
"""

import re
from urllib.parse import urlsplit

from django.utils.translation import gettext as _

from hosts.models import Host
from kvmweb.accounts.roles import sees_everything


class HostMask:
    """The masking rules for one viewer (cheap to build; one query the first time a
    host name must be checked against a self-service user's scope)."""

    def __init__(self, user):
        self.user = user
        self.sees_all = sees_everything(user)
        self.sees_uris = user.is_authenticated and user.has_perm("hosts.change_host")
        self._visible = None

    @classmethod
    def for_user(cls, user):
        """The mask of ``user``, kept on the user object: a request builds it once, and a
        WebSocket watcher's user object (replaced by a fresh one at every scope re-check,
        migrations_app/streaming.py) keeps it between ticks."""
        mask = getattr(user, "_kvmweb_host_mask", None)
        if mask is None:
            mask = cls(user)
            try:
                user._kvmweb_host_mask = mask
            except AttributeError:  # AnonymousUser and other slotted users
                pass
        return mask

    @property
    def visible(self):
        if self._visible is None:
            self._visible = set(Host.objects.restrict(self.user).values_list("name", flat=True))
        return self._visible

    @property
    def is_identity(self):
        """True when this viewer sees everything as it is (no masking at all)."""
        return self.sees_all and self.sees_uris

    def shows_host(self, name):
        return self.sees_all or not name or name in self.visible

    def host_name(self, name):
        return name if self.shows_host(name) else str(_("another host"))

    def variant(self, job):
        """What differs for this viewer on this job: equal variants render equally."""
        if self.is_identity:
            return ()
        hidden = sorted({n for n in (job.source_name, job.target_name) if not self.shows_host(n)})
        return (self.sees_uris, tuple(hidden))

    # -- text -------------------------------------------------------------------------

    def _pairs(self, hosts):
        """(secret, replacement) pairs for hosts given as (name, [uris]), longest first."""
        pairs = []
        for name, uris in hosts:
            shown = self.host_name(name)
            if not self.sees_uris:
                for uri in uris:
                    if not uri:
                        continue
                    pairs.append((uri, f"<{shown}>"))
                    try:
                        hostname = urlsplit(uri).hostname
                    except ValueError:
                        hostname = None
                    if hostname and len(hostname) >= 4:
                        pairs.append((hostname, f"<{shown}>"))
            if name and shown != name:
                pairs.append((name, shown))
        return sorted(set(pairs), key=lambda pair: -len(pair[0]))

    @staticmethod
    def _apply(text, pairs):
        if not text or not pairs or not isinstance(text, str):
            return text
        for secret, shown in pairs:
            # Whole words only: a host named "db" must not eat "dbus" or "db-backup".
            text = re.sub(rf"(?<![\w.-]){re.escape(secret)}(?![\w-])", lambda m, s=shown: s, text)
        return text

    def _data(self, value, pairs):
        if isinstance(value, str):
            return self._apply(value, pairs)
        if isinstance(value, dict):
            return {k: self._data(v, pairs) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._data(v, pairs) for v in value]
        return value

    def job_pairs(self, job):
        if self.is_identity:
            return []
        plan = (getattr(job, "preflight", None) or {}).get("plan") or {}
        hosts = []
        for side in ("source", "target"):
            uris = []
            host = getattr(job, side, None) if getattr(job, f"{side}_id", None) else None
            if host is not None:
                uris.append(host.uri)
            stored = plan.get(side) if isinstance(plan, dict) else None
            if isinstance(stored, dict) and stored.get("uri"):
                uris.append(stored["uri"])
            hosts.append((getattr(job, f"{side}_name", ""), uris))
        return self._pairs(hosts)

    def text(self, text, job):
        """``text`` about ``job`` as this viewer may read it."""
        if not text:
            return text
        return self._apply(text, self.job_pairs(job))

    def data(self, value, job):
        """Every string inside ``value`` (dicts, lists) masked as ``text``."""
        if not value:
            return value  # nothing to mask, and no host lookups for it
        pairs = self.job_pairs(job)
        return self._data(value, pairs) if pairs else value

    def about_hosts(self, value, hosts):
        """``value`` (text, or dicts and lists of it) about ``hosts`` (Host objects), as
        this viewer may read it: URIs hidden, out-of-scope names replaced."""
        if self.is_identity or not value:
            return value
        pairs = self._pairs([(h.name, [h.uri]) for h in hosts])
        return self._data(value, pairs) if pairs else value

    def host_text(self, host, text):
        """A text about one host in the viewer's scope (its last error): URIs hidden."""
        if self.sees_uris or not text:
            return text
        return self._apply(text, self._pairs([(host.name, [host.uri])]))

    @staticmethod
    def subject(source, target):
        """Something to mask texts about a planned move from ``source`` to ``target``
        (Host objects) before any job exists (the wizard, the dry run)."""
        from types import SimpleNamespace

        return SimpleNamespace(
            source=source,
            source_id=getattr(source, "pk", None),
            source_name=getattr(source, "name", ""),
            target=target,
            target_id=getattr(target, "pk", None),
            target_name=getattr(target, "name", ""),
            preflight={},
        )

    # -- objects ----------------------------------------------------------------------

    def job(self, job):
        """The job as this viewer may see it (the job itself when nothing is masked)."""
        if isinstance(job, MaskedJob) or self.is_identity:
            return job
        return MaskedJob(job, self)

    def jobs(self, jobs):
        return [self.job(job) for job in jobs]

    def event(self, event, job):
        if self.is_identity:
            return event
        # ``text`` is the line in the viewer's language (code + parameters, which may
        # name a host): masked after rendering, like the stored English ``message``.
        return _Masked(event, {"message": self.text(event.message, job), "text": self.text(event.text, job)})

    def events(self, events, job):
        return [self.event(event, job) for event in events]

    def report(self, report, job):
        """A preflight Report (or its dict) with findings, remedies, details and the
        virsh line masked."""
        if self.is_identity or report is None:
            return report
        # Imported here: the preflight package imports the job modules, which publish
        # masked job updates through this module.
        from migrations_app.preflight import Report

        data = report.to_dict() if isinstance(report, Report) else report
        return Report.from_dict(self.data(data, job))


class _Masked:
    """A read-only view of a model instance with some attributes replaced."""

    def __init__(self, obj, replaced):
        self.__dict__["_obj"] = obj
        self.__dict__["_replaced"] = replaced

    def __getattr__(self, name):
        replaced = self.__dict__["_replaced"]
        if name in replaced:
            return replaced[name]
        return getattr(self.__dict__["_obj"], name)

    def __setattr__(self, name, value):
        # Extra attributes for a template (a URL, a label) are fine; the object's own
        # fields stay as masked.
        if hasattr(self.__dict__["_obj"], name):
            raise AttributeError(f"a masked view is read-only ({name})")
        self.__dict__["_replaced"][name] = value

    def save(self, *args, **kwargs):
        raise TypeError("a masked view cannot be saved")

    delete = save

    def __str__(self):
        return str(self.__dict__["_obj"])


class MaskedJob(_Masked):
    """A MigrationJob as one viewer may see it: host names outside their scope and
    URIs (for non-administrators) replaced in every field that can carry them."""

    def __init__(self, job, mask):
        super().__init__(job, {})
        self.__dict__["host_mask"] = mask
        self.__dict__["_cache"] = {}

    def __getattr__(self, name):
        replaced = self.__dict__["_replaced"]
        if name in replaced:
            return replaced[name]
        if name in ("source_name", "target_name"):
            return self.host_mask.host_name(getattr(self._obj, name))
        if name in ("error", "error_text", "preflight", "reason"):
            cache = self.__dict__["_cache"]
            if name not in cache:
                cache[name] = self.host_mask.data(getattr(self._obj, name), self._obj)
            return cache[name]
        return getattr(self.__dict__["_obj"], name)

    @property
    def _obj(self):
        return self.__dict__["_obj"]
