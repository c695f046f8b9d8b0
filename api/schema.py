"""OpenAPI description of the Bearer token scheme (drf-spectacular extension) and the schema
class settings name (REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]): DRF imports this module when
it first builds a view's schema, which registers the extension before it is needed."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema


class AutoSchema(SpectacularAutoSchema):
    """drf-spectacular's AutoSchema; a subclass only so that loading it loads this module."""


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token from your account page or `manage.py api_token USER`.",
        }
