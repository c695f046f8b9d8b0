"""kvmweb settings: one module, every value from the environment via kvmweb.env.

Embedded default (no variables set): SQLite in WAL mode with IMMEDIATE transactions under
./var/, django-q2's ORM broker, an in-process channel layer. Scale-out: set DATABASE_URL
(PostgreSQL) and REDIS_URL (channels-redis). See README.md for the full list.
"""

import os
import sys
from pathlib import Path

from django.utils.translation import gettext_lazy as _

from kvmweb.env import (
    database_from_url,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_secret,
    env_str,
    secure_data_dir,
)

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("KVMWEB_DATA_DIR", str(BASE_DIR / "var")))
# umask 077 for the whole process, data directory 0700 and everything in it 0600
# (docs/security.md); a database kept elsewhere gets the same treatment.
secure_data_dir(
    DATA_DIR,
    [p for p in [env_str("KVMWEB_SQLITE_PATH")] if p and not env_str("DATABASE_URL")],
    public=[env_str("KVMWEB_STATIC_ROOT", str(DATA_DIR / "staticfiles"))],
)

DEBUG = env_bool("KVMWEB_DEBUG", False)
SECRET_KEY = env_secret("KVMWEB_SECRET_KEY", fallback_file=DATA_DIR / "secret_key")
# The audit chain is keyed separately from SECRET_KEY: rotating the session key must not
# break verification of years of audit history, and leaking one must not forge the other.
AUDIT_HMAC_KEY = env_secret("KVMWEB_AUDIT_KEY", fallback_file=DATA_DIR / "audit_key")
ALLOWED_HOSTS = env_list("KVMWEB_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("KVMWEB_CSRF_TRUSTED_ORIGINS", [])
SECURE_COOKIES = env_bool("KVMWEB_SECURE_COOKIES", False)
SESSION_COOKIE_SECURE = SECURE_COOKIES
CSRF_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_HTTPONLY = True
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("KVMWEB_BEHIND_PROXY", False) else None
)
# Request limits (kvmweb/serve.py enforces them in daphne before buffering, kvmweb/limits.py
# again for any ASGI server; docs/deploy.md shows the matching nginx limits).
KVMWEB_MAX_REQUEST_BYTES = env_int("KVMWEB_MAX_REQUEST_BYTES", 2 * 1024 * 1024, minimum=1024)
KVMWEB_REQUEST_TIMEOUT = env_int("KVMWEB_REQUEST_TIMEOUT", 30, minimum=1)
KVMWEB_WS_MAX_MESSAGE_BYTES = env_int("KVMWEB_WS_MAX_MESSAGE_BYTES", 64 * 1024, minimum=1024)
# Listen backlog of daphne's sockets (kvmweb/serve.py): connections queued by the kernel
# while daphne accepts, e.g. every browser's WebSocket reconnecting after a restart.
KVMWEB_LISTEN_BACKLOG = env_int("KVMWEB_LISTEN_BACKLOG", 1024, minimum=16)
# Seconds daphne (kvmweb/serve.py) gives requests in flight to finish after SIGTERM, once
# it stopped listening and closed every WebSocket with 1012 "service restart" (pages reconnect).
KVMWEB_SHUTDOWN_GRACE = env_float("KVMWEB_SHUTDOWN_GRACE", 5.0, minimum=0.0)
# WebSocket handshakes run at a time per daphne process (kvmweb/handshake.py); the others
# wait their turn instead of all timing out together when many browsers reconnect at once.
KVMWEB_WS_HANDSHAKE_CONCURRENCY = env_int("KVMWEB_WS_HANDSHAKE_CONCURRENCY", 8, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = KVMWEB_MAX_REQUEST_BYTES
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_q",
    "django_htmx",
    "kvmweb.audit",
    "kvmweb.accounts",
    "hosts",
    "migrations_app",
    "fleet",
]

# daphne's app only gives `manage.py runserver` its ASGI server; importing it installs
# Twisted's reactor (~0.2 s of every process start: every management command, every
# worker). kvmweb is served by kvmweb/serve.py or the daphne command, which do not need the
# app, so it is installed only for runserver.
if sys.argv[1:2] == ["runserver"]:
    INSTALLED_APPS.insert(0, "daphne")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "kvmweb.security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "kvmweb.urls"
ASGI_APPLICATION = "kvmweb.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
                "kvmweb.context_processors.site",
            ],
            # Display filters every template uses (binary units, local time with zone).
            "builtins": ["kvmweb.accounts.templatetags.kvmweb_format"],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": database_from_url(DATABASE_URL)}
else:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("KVMWEB_SQLITE_PATH", str(DATA_DIR / "kvmweb.sqlite3")),
            "OPTIONS": {
                # IMMEDIATE: a write transaction takes the write lock when it begins, so two
                # writers queue on busy_timeout instead of one failing with "database is
                # locked" when it upgrades a read lock (the classic SQLite deadlock).
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                    "PRAGMA foreign_keys=ON; PRAGMA busy_timeout=20000;"
                ),
            },
            "TEST": {"NAME": env_str("KVMWEB_TEST_SQLITE_PATH")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # Redis Pub/Sub: a group message is one PUBLISH, and each subscribed process
            # gets it pushed on the connection it listens on. The list-based
            # RedisChannelLayer took five round trips per job update on the way (group
            # expiry, members, message expiry, the Lua send; the receiver's backup copy)
            # and every one of them waits for a process to be scheduled: on a loaded host
            # that alone put a watcher's p95 above 100 ms (benchmarks/progress_latency.py).
            # Pub/Sub delivers at most once, to processes listening at that instant; the
            # job hub's database poll is the catch-up for a lost message
            # (migrations_app/streaming.py).
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            # redis-py 8 made socket_timeout default to 5 s: a blocking read on an idle
            # connection then raises TimeoutError (django/channels_redis#422). None, as
            # before redis-py 8.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# django-q2 with the ORM broker. The default cluster runs short housekeeping tasks
# (inventory sync). Migrations run on their own cluster (Q_CLUSTER_NAME=migrations): one
# attempt only, and `retry` far above the longest migration, because the ORM broker
# re-delivers any task still running after `retry` seconds (seen: a 9 s task ran three
# times with retry=3). The job row claim is the second line of defence.
MIGRATION_TIMEOUT = env_int("KVMWEB_MIGRATION_TIMEOUT", 6 * 3600, minimum=60)
# How often an idle pusher reads the queue table. Every task queued on this machine wakes
# its queue's pushers at once (kvmweb/qbroker.py), so the poll only finds tasks queued on
# other machines (PostgreSQL) or re-delivered after `retry`. On SQLite every process is on
# this machine: a long poll loses nothing, and the short ones cost an idle pair of
# clusters 8 % of a core (83 CPU ticks in 10 s against 24 with 1 s polls).
_SHARED_DB = bool(DATABASE_URL)
Q_CLUSTER = {
    "name": "kvmweb",
    "orm": "default",
    # The ORM broker, whose pushers a task queued on this machine wakes at once instead of
    # their next poll (kvmweb/qbroker.py).
    "broker_class": "kvmweb.qbroker.WakeableORM",
    # Two of them are taken by the minute-long loops (reconcile watch, notification
    # dispatch): a third keeps inventory syncs from waiting behind them.
    "workers": env_int("KVMWEB_WORKERS", 3, minimum=1),
    "timeout": 600,
    "retry": 900,
    "max_attempts": 1,
    "catch_up": False,
    "save_limit": 500,
    "poll": 0.2 if _SHARED_DB else 1.0,
    "ALT_CLUSTERS": {
        "migrations": {
            # One worker per concurrent migration; a worker mostly waits on libvirt (the
            # source libvirtd drives a peer-to-peer migration). With 4, eight migrations
            # started together ran in two waves (benchmarks/concurrent_migrations.py
            # --embedded: the second four queued ~4 s, 2.3x eight parallel virsh).
            "workers": env_int("KVMWEB_MIGRATION_WORKERS", 8, minimum=1),
            "timeout": MIGRATION_TIMEOUT,
            "retry": MIGRATION_TIMEOUT + 600,
            "max_attempts": 1,
            # Queue pickup is part of every migration's wall time (benchmarks/migrate_vs_virsh.py).
            # A job queued on this machine wakes the pusher at once (kvmweb/qbroker.py); for
            # jobs queued on other machines, 20 cheap indexed polls/s keep it ~30 ms on average.
            "poll": 0.05 if _SHARED_DB else 1.0,
        },
    },
}
INVENTORY_SYNC_MINUTES = env_int("KVMWEB_INVENTORY_SYNC_MINUTES", 5, minimum=1)

# libvirt's test driver opens any XML node file it is named: test:// URIs may name only
# files under this directory (unset: only the built-in test:///default). hosts/uris.py
KVMWEB_TEST_DRIVER_DIR = env_str("KVMWEB_TEST_DRIVER_DIR")

# Every libvirt connect and call from web-facing code is bounded by these (seconds).
LIBVIRT_CONNECT_TIMEOUT = env_float("KVMWEB_LIBVIRT_CONNECT_TIMEOUT", 5.0, minimum=0.1)
LIBVIRT_CALL_TIMEOUT = env_float("KVMWEB_LIBVIRT_CALL_TIMEOUT", 15.0, minimum=0.1)
# qemu+tls hosts: warn this many days before kvmweb's client certificate expires. hosts/transport.py
TLS_EXPIRY_WARN_DAYS = env_int("KVMWEB_TLS_EXPIRY_WARN_DAYS", 30, minimum=1)
# kvmweb's own SSH key for qemu+ssh hosts (unset: <data dir>/ssh/id_ed25519). hosts/transport.py
SSH_KEY_FILE = env_str("KVMWEB_SSH_KEY_FILE")
# Preflight "migration_ports": each probed port's answer limit (seconds) and how long a
# measurement is reused for the same hosts. hosts/reach.py
PORT_PROBE_TIMEOUT = env_float("KVMWEB_PORT_PROBE_TIMEOUT", 1.0, minimum=0.1)
PORT_PROBE_CACHE_SECONDS = env_int("KVMWEB_PORT_PROBE_CACHE_SECONDS", 300, minimum=0)

# Preflight checklist (migrations_app/preflight/): free memory the target must keep
# beyond the guest's size; the whole checklist's time limit and its libvirt timeouts; the
# dirty-rate measurement (period, reuse window); the link speed assumed when no earlier
# migration between two hosts tells us better.
KVMWEB_PREFLIGHT_MEMORY_MARGIN_MIB = env_int("KVMWEB_PREFLIGHT_MEMORY_MARGIN_MIB", 256, minimum=0)
PREFLIGHT_TIMEOUT = env_float("KVMWEB_PREFLIGHT_TIMEOUT", 20.0, minimum=1)
PREFLIGHT_CONNECT_TIMEOUT = env_float("KVMWEB_PREFLIGHT_CONNECT_TIMEOUT", 3.0, minimum=0.1)
PREFLIGHT_CALL_TIMEOUT = env_float("KVMWEB_PREFLIGHT_CALL_TIMEOUT", 8.0, minimum=0.1)
PREFLIGHT_DIRTY_RATE_SECONDS = env_int("KVMWEB_PREFLIGHT_DIRTY_RATE_SECONDS", 1, minimum=1)
PREFLIGHT_DIRTY_RATE_MAX_AGE = env_float("KVMWEB_PREFLIGHT_DIRTY_RATE_MAX_AGE", 60.0, minimum=0)
PREFLIGHT_ASSUMED_BANDWIDTH_MIBS = env_int("KVMWEB_PREFLIGHT_ASSUMED_BANDWIDTH_MIBS", 117, minimum=1)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
# Sign-in rate limit: failures per (username, address) within the window.
LOGIN_MAX_FAILURES = env_int("KVMWEB_LOGIN_MAX_FAILURES", 5, minimum=1)
LOGIN_FAILURE_WINDOW = env_int("KVMWEB_LOGIN_FAILURE_WINDOW", 300, minimum=1)

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = env_str("KVMWEB_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Collected static files are public (CSS, JS): when nginx serves them, point
# KVMWEB_STATIC_ROOT outside the private data directory (docs/deploy.md); they are written
# world-readable whatever the umask.
STATIC_ROOT = Path(env_str("KVMWEB_STATIC_ROOT", str(DATA_DIR / "staticfiles")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage",
        "OPTIONS": {"file_permissions_mode": 0o644, "directory_permissions_mode": 0o755},
    },
}
WHITENOISE_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"one_line_403": {"()": "kvmweb.security.OneLineForbidden"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("KVMWEB_LOG_LEVEL", "INFO")},
    "loggers": {"django_q": {"level": "WARNING"}, "django.request": {"filters": ["one_line_403"]}},
}

# --- Integrations: REST API (api/), metrics (api/metrics.py), notifications (notifications/).
# See docs/api.md and docs/deploy.md.
INSTALLED_APPS += ["rest_framework", "drf_spectacular", "drf_spectacular_sidecar", "api", "notifications"]
REST_FRAMEWORK = {
    # Bearer tokens first; the session (with DRF's CSRF check) for the browser and the docs.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["api.throttling.TokenRateThrottle"],
    "DEFAULT_PAGINATION_CLASS": "api.pagination.Pagination",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # drf-spectacular's AutoSchema with the Bearer scheme registered (api/schema.py): loaded
    # only when a schema is built, not at every process start (~0.2 s of imports).
    "DEFAULT_SCHEMA_CLASS": "api.schema.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "kvmweb API",
    "VERSION": "1",
    "DESCRIPTION": "Hosts, VMs, preflight, migration jobs, approvals and the audit history (docs/api.md).",
    "SWAGGER_UI_DIST": "SIDECAR",  # served from our own static files: no CDN
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "JobStatusEnum": "migrations_app.models.MigrationJob.STATUSES",
        "HostStatusEnum": "hosts.models.Host.STATUSES",
    },
}
# Requests per token (or per signed-in user, or per address) and period: "600/min".
KVMWEB_API_RATE = env_str("KVMWEB_API_RATE", "600/min")
# Bad tokens from one address within 5 minutes before it is refused outright (429).
KVMWEB_API_AUTH_FAILURES = env_int("KVMWEB_API_AUTH_FAILURES", 20, minimum=1)
if REDIS_URL:
    # The rate limit's counters are shared by every daphne process only through a shared cache.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
# prometheus-client's multiprocess mode: every process (daphne, each qcluster) writes its
# counters to files here; /metrics adds them up. scripts/run.sh empties it at start. The
# variable must be set before prometheus_client is imported, which settings guarantee.
METRICS_DIR = Path(env_str("PROMETHEUS_MULTIPROC_DIR", str(DATA_DIR / "prometheus")))
METRICS_DIR.mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)
# /metrics is open to loopback and to these addresses/networks (comma separated, CIDR ok);
# anyone else needs an API token of a user with the api.view_metrics permission.
METRICS_ALLOW = env_list("KVMWEB_METRICS_ALLOW", [])
# Notifications: SMTP for the email channel (docs/deploy.md).
NOTIFY_SMTP_HOST = env_str("KVMWEB_SMTP_HOST", "localhost")
NOTIFY_SMTP_PORT = env_int("KVMWEB_SMTP_PORT", 25, minimum=1)
NOTIFY_SMTP_USER = env_str("KVMWEB_SMTP_USER", "")
NOTIFY_SMTP_PASSWORD = env_secret("KVMWEB_SMTP_PASSWORD") if env_str("KVMWEB_SMTP_USER") else ""
NOTIFY_SMTP_TLS = env_bool("KVMWEB_SMTP_STARTTLS", False)
NOTIFY_FROM = env_str("KVMWEB_NOTIFY_FROM", "kvmweb@localhost")
NOTIFY_TIMEOUT = env_float("KVMWEB_NOTIFY_TIMEOUT", 10.0, minimum=0.5)
NOTIFY_VERIFY_MINUTES = env_int("KVMWEB_NOTIFY_VERIFY_MINUTES", 60, minimum=1)
