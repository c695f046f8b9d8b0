"""Validation of libvirt connection URIs before kvmweb ever opens one.

libvirt URI query parameters are powerful: ``?command=`` runs a local program for the ext
transport, ``?netcat=`` names a program run on the remote side, ``?no_verify=1`` turns off
TLS certificate checks. kvmweb accepts only the transports and parameters below and names
the offending part of anything else.

Accepted URIs are returned in one normal form, so one host cannot be registered twice
under spellings libvirt treats as the same: lower-case scheme and host name, IPv4
addresses in dotted quads (``0x7f.0.0.2`` and ``2130706434`` are 127.0.0.2 to the
resolver), compressed IPv6, no default port (16509 for tcp, 16514 for tls, 22 for ssh),
no trailing slash, parameters in a fixed order. Spellings that still differ (another
name of the same machine, a different parameter) are caught by the host UUID at
registration (hosts/services.py).

``test://`` (libvirt's in-process test driver) opens any XML file it is given: only the
built-in ``test:///default`` is accepted, and node files under the directory named by
KVMWEB_TEST_DRIVER_DIR (unset: none).
"""

import ipaddress
import os
import re
import socket
from urllib.parse import parse_qsl, urlsplit

from django.conf import settings
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

# qemu+libssh2 / qemu+libssh: libvirt's built-in SSH clients, the SSH transports that
# honour ``known_hosts=`` (qemu+ssh runs the ssh binary, which reads ~/.ssh/known_hosts).
ALLOWED_SCHEMES = {
    "qemu",
    "qemu+ssh",
    "qemu+libssh2",
    "qemu+libssh",
    "qemu+tls",
    "qemu+tcp",
    "qemu+unix",
    "test",
}
SSH_SCHEMES = {"qemu+ssh", "qemu+libssh2", "qemu+libssh"}
ALLOWED_PATHS = {"qemu": {"/system", "/session"}}
# Parameter -> transports where it is accepted. Everything else is refused.
SAFE_PARAMS = {
    "keyfile": SSH_SCHEMES,
    "known_hosts": SSH_SCHEMES,
    "known_hosts_verify": SSH_SCHEMES,
    "sshauth": SSH_SCHEMES,
    "no_tty": {"qemu+ssh"},
    "pkipath": {"qemu+tls"},
    "tls_priority": {"qemu+tls"},
    "mode": {"qemu+ssh", "qemu+libssh2", "qemu+libssh", "qemu+tls", "qemu+tcp", "qemu+unix"},
    "proxy": SSH_SCHEMES,
}
PARAM_VALUES = {
    "mode": {"auto", "legacy", "direct"},
    "proxy": {"auto", "native"},
    # "auto" adds an unknown host key without asking and "ignore" skips the check: kvmweb
    # confirms host keys with an administrator instead (hosts/services.py).
    "known_hosts_verify": {"normal"},
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
DEFAULT_PORTS = {"qemu+tcp": 16509, "qemu+tls": 16514, "qemu+ssh": 22, "qemu+libssh2": 22, "qemu+libssh": 22}
HOST_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
HOST_NAME = re.compile(rf"{HOST_LABEL}(\.{HOST_LABEL})*")
# What inet_aton (and so getaddrinfo) reads as an IPv4 address: 1 to 4 parts, decimal,
# octal (leading 0) or hexadecimal (0x).
NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}")


class InvalidURI(ValueError):
    """The URI is not acceptable; the message says which part and why."""


def _normal_host(host):
    """The host part in one spelling (see the module docstring), or raise InvalidURI."""
    host = host.lower().rstrip(".")
    if host.startswith("-"):
        # ssh would read it as an option (qemu+ssh://-oProxyCommand=.../system).
        raise InvalidURI(_("The host name must not start with '-'."))
    if ":" in host:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidURI(_("%(host)r is not a valid IPv6 address.") % {"host": host}) from None
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return f"[{address.compressed}]"
    if NUMERIC_HOST.fullmatch(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise InvalidURI(_("%(host)r is not a valid IPv4 address.") % {"host": host}) from None
    if len(host) > 253 or not HOST_NAME.fullmatch(host):
        raise InvalidURI(_("%(host)r is not a valid host name.") % {"host": host})
    return host


def _test_driver_path(path):
    """Refuse test-driver node files outside KVMWEB_TEST_DRIVER_DIR."""
    if path == "/default":
        return path
    allowed = getattr(settings, "KVMWEB_TEST_DRIVER_DIR", None)
    if not allowed or not path.endswith(".xml"):
        raise InvalidURI(
            _(
                "test:// URIs must be test:///default or a .xml node file under the directory "
                "named by KVMWEB_TEST_DRIVER_DIR."
            )
        )
    real, base = os.path.realpath(path), os.path.realpath(allowed)
    if os.path.commonpath([real, base]) != base:
        raise InvalidURI(
            _("test:// node files must be under %(dir)s (KVMWEB_TEST_DRIVER_DIR).") % {"dir": base}
        )
    return path


def validate_uri(uri):
    """Return the URI in its normal form (see the module docstring), or raise InvalidURI."""
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
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. a bracketed host that is not an IPv6 address
        raise InvalidURI(_("The host part is not a valid host name or IPv6 address.")) from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise InvalidURI(
            _("Transport %(scheme)r is not allowed. Use one of: %(allowed)s.")
            % {"scheme": parts.scheme or "(none)", "allowed": ", ".join(sorted(ALLOWED_SCHEMES))}
        )
    if parts.fragment:
        raise InvalidURI(_("The URI must not contain a #fragment."))
    path = parts.path.rstrip("/") if parts.path != "/" else parts.path
    netloc = ""
    if scheme == "test":
        if parts.netloc:
            raise InvalidURI(_("test:// URIs take no host: use test:///default or test:///abs/path.xml."))
        path = _test_driver_path(path)
    else:
        if path not in ALLOWED_PATHS["qemu"]:
            raise InvalidURI(
                _("The path must be /system or /session (got %(path)r).") % {"path": parts.path or ""}
            )
        if scheme in ("qemu", "qemu+unix") and parts.hostname:
            raise InvalidURI(_("%(scheme)s URIs connect locally and take no host name.") % {"scheme": scheme})
        if scheme in ("qemu+tls", "qemu+tcp", *SSH_SCHEMES) and not parts.hostname:
            raise InvalidURI(_("%(scheme)s URIs need a host name.") % {"scheme": scheme})
        try:
            parts.port  # noqa: B018  (raises on a malformed port)
        except ValueError:
            raise InvalidURI(_("The port is not a number between 0 and 65535.")) from None
        if parts.password:
            raise InvalidURI(_("Do not put passwords in the URI; use SSH keys or TLS certificates."))
        if parts.hostname:
            user = parts.username
            if user is not None and (not user or user.startswith("-")):
                raise InvalidURI(_("The user name must not be empty or start with '-'."))
            netloc = _normal_host(parts.hostname)
            if user is not None:
                netloc = f"{user}@{netloc}"
            if parts.port is not None and parts.port != DEFAULT_PORTS.get(scheme):
                netloc = f"{netloc}:{parts.port}"
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
    query = "&".join(sorted((p for p in parts.query.split("&") if p), key=lambda p: p.lower()))
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def normalize_uri(uri):
    """The normal form of a stored URI for comparisons; the URI itself when it does not
    validate any more (e.g. registered before a rule was added)."""
    try:
        return validate_uri(uri)
    except InvalidURI:
        return (uri or "").strip()
