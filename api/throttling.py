"""Rate limit per API token (or per signed-in user, or per address for the anonymous)."""

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

from api.models import ApiToken


class TokenRateThrottle(SimpleRateThrottle):
    """KVMWEB_API_RATE requests per period for each token. Counters live in Django's
    cache: per process by default, shared by every daphne process with REDIS_URL set."""

    scope = "api"

    def get_rate(self):
        # Read on every request (not frozen at import), so the setting can change in tests.
        return settings.KVMWEB_API_RATE

    def get_cache_key(self, request, view):
        if isinstance(request.auth, ApiToken):
            ident = f"token-{request.auth.prefix}"  # random: never shared by two tokens
        elif request.user and request.user.is_authenticated:
            ident = f"user-{request.user.pk}"
        else:
            ident = f"addr-{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}
