"""{% pending_approvals %}: how many migration requests wait for this operator."""

from django import template

from kvmweb.access import scoped
from migrations_app.models import MigrationJob

register = template.Library()


@register.simple_tag(takes_context=True)
def pending_approvals(context):
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.has_perm("migrations_app.approve_migrationjob"):
        return 0
    return scoped(MigrationJob, user, "approve").filter(status=MigrationJob.PENDING_APPROVAL).count()
