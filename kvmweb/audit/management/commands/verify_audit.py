"""manage.py verify_audit: is the audit history intact?

Checks that the append-only guards (database triggers) work, by behaviour: inside a
transaction that is rolled back, an UPDATE and a DELETE of a probe row must be refused
(a trigger with the right name and a body that does nothing fails this). Then it walks
the HMAC chain from the first event. Prints the first broken link (id, time, action, reason) and
exits 1 on any problem, 0 when everything holds, so cron or monitoring can alert on it.

The chain alone cannot show that the newest events were cut off (a shorter chain is still
a valid chain). On success the command prints the last hash; keep it somewhere else (the
cron mail, the monitoring system) and pass it back with --expect HASH: the check then
also fails when that event is no longer in the chain.
"""

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from kvmweb.audit import guards
from kvmweb.audit.models import AuditEvent
from kvmweb.audit.services import verify_chain


class Command(BaseCommand):
    help = "Verify the audit history: HMAC chain and append-only guards. Exit 1 on any problem."

    def add_arguments(self, parser):
        parser.add_argument("--database", default="default", help="database alias (default: default)")
        parser.add_argument(
            "--install-guards",
            action="store_true",
            help="(re)install the append-only triggers first, replacing any of the same name",
        )
        parser.add_argument(
            "--expect",
            action="append",
            default=[],
            metavar="HASH",
            help="a hash printed by an earlier run: fail if that event is gone (tail cut off)",
        )

    def handle(self, *args, database="default", expect=(), install_guards=False, **options):
        connection = connections[database]
        problems = []
        if install_guards:
            guards.install(connection)
            self.stdout.write("append-only guards (re)installed")
        accepted = [verb for verb, refused in guards.refusals(connection).items() if not refused]
        if accepted:
            problems.append(
                f"append-only guards are missing or do nothing: the audit table accepted "
                f"{' and '.join(accepted)} of a probe row (rolled back) "
                "(reinstall them: manage.py verify_audit --install-guards)"
            )
        try:
            count, bad, reason = verify_chain(using=database)
        except (ValueError, TypeError) as exc:
            # A row edited into something unreadable (e.g. invalid JSON in details).
            count, bad, reason = 0, None, ""
            problems.append(f"chain unreadable: {exc.__class__.__name__}: {exc}")
        if bad is not None:
            problems.append(
                f"chain broken at event id={bad.pk} at={bad.at.isoformat()} action={bad.action}: {reason}"
                f" ({count} events before it verified)"
            )
        for wanted in expect:
            if not AuditEvent.objects.using(database).filter(hash=wanted.strip().lower()).exists():
                problems.append(f"expected event {wanted} is missing: events were removed from the end")
        if problems:
            for problem in problems:
                self.stderr.write(f"FAIL {problem}")
            raise CommandError(f"audit history NOT intact: {len(problems)} problem(s)", returncode=1)
        last = AuditEvent.objects.using(database).order_by("-id").values_list("hash", flat=True).first()
        self.stdout.write(
            f"OK {count} events, chain intact, append-only guards installed (UPDATE and DELETE refused)"
        )
        if last:
            self.stdout.write(f"last hash {last} (keep it; check later with --expect {last})")
