"""Validation of libvirt connection URIs before kvmweb ever opens one.

libvirt URI query parameters are powerful: ``?command=`` runs a local program for the ext
transport, ``?netcat=`` names a program run on the remote side, ``?no_verify=1`` turns off
TLS certificate checks. kvmweb accepts only the transports and parameters below and names
the offending part of anything else.
"""

from urllib.parse import parse_qsl, urlsplit

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

ALLOWED_SCHEMES = {"qemu", "qemu+ssh", "qemu+tls", "qemu+tcp", "qemu+unix", "test"}
ALLOWED_PATHS = {"qemu": {"/system", "/session"}}
# Parameter -> transports where it is accepted. Everything else is refused.
SAFE_PARAMS = {
    "keyfile": {"qemu+ssh"},
    "known_hosts": {"qemu+ssh"},
    "known_hosts_verify": {"qemu+ssh"},
    "sshauth": {"qemu+ssh"},
    "no_tty": {"qemu+ssh"},
    "pkipath": {"qemu+tls"},
    "tls_priority": {"qemu+tls"},
    "mode": {"qemu+ssh", "qemu+tls", "qemu+tcp", "qemu+unix"},
    "proxy": {"qemu+ssh"},
}
PARAM_VALUES = {
    "mode": {"auto", "legacy", "direct"},
    "proxy": {"auto", "native"},
    "known_hosts_verify": {"normal", "auto"},
    "no_tty": {"0", "1"},
}
REFUSED_REASONS = {
    "command": gettext_lazy("it runs a program on the kvmweb machine"),
    "netcat": gettext_lazy("it names a program to run on the remote host"),
    "socket": gettext_lazy("it points libvirt at an arbitrary socket path"),
    "no_verify": gettext_lazy("it disables TLS certificate verification"),
    "name": gettext_lazy("it overrides which hypervisor driver the remote end opens"),
}
FORBIDDEN_CHARS = set(" \t\r\n\"'`;|$<>\\")


class InvalidURI(ValueError):
    """The URI is not acceptable; the message says which part and why."""


def validate_uri(uri):
    """Return the URI stripped of surrounding space, or raise InvalidURI."""
    uri = (uri or "").strip()
    if not uri:
        raise InvalidURI(_("Enter a libvirt URI, for example qemu+ssh://root@host/system."))
    if len(uri) > 500:
        raise InvalidURI(_("The URI is longer than 500 characters."))
    bad = sorted(FORBIDDEN_CHARS & set(uri))
    if bad or any(ord(ch) < 32 for ch in uri):
        raise InvalidURI(
            _("The URI contains characters that are not allowed: %(chars)s")
            % {"chars": " ".join(repr(c) for c in bad) or _("control characters")}
        )
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise InvalidURI(
            _("Transport %(scheme)r is not allowed. Use one of: %(allowed)s.")
            % {"scheme": parts.scheme or "(none)", "allowed": ", ".join(sorted(ALLOWED_SCHEMES))}
        )
    if parts.fragment:
        raise InvalidURI(_("The URI must not contain a #fragment."))
    if scheme == "test":
        if parts.netloc:
            raise InvalidURI(_("test:// URIs take no host: use test:///default or test:///abs/path.xml."))
        if parts.path != "/default" and not parts.path.endswith(".xml"):
            raise InvalidURI(
                _("test:// URIs must be test:///default or an absolute path to a .xml node file.")
            )
    else:
        if parts.path not in ALLOWED_PATHS["qemu"]:
            raise InvalidURI(
                _("The path must be /system or /session (got %(path)r).") % {"path": parts.path or ""}
            )
        if scheme in ("qemu", "qemu+unix") and parts.hostname:
            raise InvalidURI(_("%(scheme)s URIs connect locally and take no host name.") % {"scheme": scheme})
        if scheme in ("qemu+ssh", "qemu+tls", "qemu+tcp") and not parts.hostname:
            raise InvalidURI(_("%(scheme)s URIs need a host name.") % {"scheme": scheme})
        try:
            parts.port  # noqa: B018  (raises on a malformed port)
        except ValueError:
            raise InvalidURI(_("The port is not a number between 0 and 65535.")) from None
        if parts.password:
            raise InvalidURI(_("Do not put passwords in the URI; use SSH keys or TLS certificates."))
    try:
        params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidURI(_("The query string is malformed.")) from None
    seen = set()
    for key, value in params:
        lowered = key.lower()
        if lowered in seen:
            raise InvalidURI(_("Parameter %(param)r is given twice.") % {"param": key})
        seen.add(lowered)
        if lowered in REFUSED_REASONS:
            raise InvalidURI(
                _("Parameter %(param)r is refused: %(reason)s.")
                % {"param": key, "reason": REFUSED_REASONS[lowered]}
            )
        if lowered not in SAFE_PARAMS:
            raise InvalidURI(
                _("Parameter %(param)r is not on the list of safe parameters (%(allowed)s).")
                % {"param": key, "allowed": ", ".join(sorted(SAFE_PARAMS))}
            )
        if scheme not in SAFE_PARAMS[lowered]:
            raise InvalidURI(
                _("Parameter %(param)r does not apply to %(scheme)s URIs.") % {"param": key, "scheme": scheme}
            )
        if lowered in PARAM_VALUES and value not in PARAM_VALUES[lowered]:
            raise InvalidURI(
                _("Parameter %(param)r must be one of: %(values)s.")
                % {"param": key, "values": ", ".join(sorted(PARAM_VALUES[lowered]))}
            )
        if lowered in ("keyfile", "known_hosts", "pkipath") and not value.startswith("/"):
            raise InvalidURI(_("Parameter %(param)r must be an absolute path.") % {"param": key})
    return uri
