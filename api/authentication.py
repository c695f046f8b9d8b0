"""Bearer-token authentication for the REST API (and nothing else: HTML pages only know
the session, so a token never signs anyone in to a page)."""

from rest_framework import authentication, exceptions

from api import services


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer kvmweb_<prefix>_<secret>``. No header: not this method
    (the session is tried next). A refused token is a 401, never a fall-through."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        keyword, _, text = header.partition(" ")
        if keyword.lower() != self.keyword.lower():
            return None
        try:
            return services.check_token(text, request._request)
        except services.TooManyFailures:
            raise exceptions.Throttled(wait=services.FAILURE_WINDOW) from None
        except services.TokenRefused:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.") from None

    def authenticate_header(self, request):
        return 'Bearer realm="kvmweb"'
