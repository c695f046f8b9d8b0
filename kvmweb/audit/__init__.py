"""Append-only, HMAC-chained audit history.

Import ``record`` from here: ``from kvmweb.audit import record``. It must be called by a
service function inside the same transaction as the change it describes.
"""


def record(*args, **kwargs):
    """Write one audit event (see kvmweb.audit.services.record)."""
    from kvmweb.audit.services import record as _record

    return _record(*args, **kwargs)


def record_refusal(*args, **kwargs):
    """Audit a refused change as a failure (see kvmweb.audit.services.record_refusal)."""
    from kvmweb.audit.services import record_refusal as _record_refusal

    return _record_refusal(*args, **kwargs)
