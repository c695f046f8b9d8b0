from django.conf import settings

from kvmweb.accounts import roles, services


def site(request):
    """Role flags for the navigation; the views still check permissions themselves."""
    user = request.user
    return {
        "sees_everything": roles.sees_everything(user),
        "is_self_service": roles.is_self_service(user),
        "debug": settings.DEBUG,
        "theme": services.current_theme(request) if user.is_authenticated else "auto",
    }
