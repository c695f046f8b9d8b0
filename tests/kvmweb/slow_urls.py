"""kvmweb's URLs plus ``/test-slow/``: a sync view that writes ``slow-entered`` in the data
dir when it starts (so a test knows the request is in flight) and answers after
``SLOW_SECONDS``."""

import time
from pathlib import Path

from django.conf import settings
from django.http import HttpResponse
from django.urls import include, path

SLOW_SECONDS = 2.0


def slow(request):
    (Path(settings.DATA_DIR) / "slow-entered").touch()
    time.sleep(SLOW_SECONDS)  # the request in flight the server must let finish
    return HttpResponse("finished")


urlpatterns = [path("test-slow/", slow), path("", include("kvmweb.urls"))]
