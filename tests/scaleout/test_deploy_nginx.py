"""The deployment guide's nginx site, for real: docs/deploy/nginx-kvmweb.conf (only its
ports, certificate paths and upstream addresses replaced) in front of two daphne
processes on PostgreSQL + Redis. HTTP redirects to HTTPS; sign-in works over the proxy
(CSRF with the trusted origin, Secure cookies because X-Forwarded-Proto says https);
WebSockets upgrade through it and receive a worker's progress; /health/ answers."""

import asyncio
import http.client
import re
import shutil
import ssl
import subprocess
from urllib.parse import urlencode

import pytest

from tests.conftest import PASSWORD
from tests.scaleout.conftest import ROOT, free_port, wait_port
from tests.scaleout.test_streaming_pg import SEQ, make_job, wait_for_seq, write_progress
from tests.scaleout.wsclient import WebSocket

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        shutil.which("nginx") is None, reason="nginx is not installed (scripts/setup.sh test)"
    ),
]
SITE = ROOT / "docs" / "deploy" / "nginx-kvmweb.conf"
NAME = "kvmweb.example.com"
WEB_ENV = {
    "KVMWEB_ALLOWED_HOSTS": NAME,
    "KVMWEB_CSRF_TRUSTED_ORIGINS": f"https://{NAME}",
    "KVMWEB_BEHIND_PROXY": "1",
    "KVMWEB_SECURE_COOKIES": "1",
}


@pytest.fixture(autouse=True)
def _fast_password_hashing():
    """Overrides tests/conftest.py's cheap hasher: here the personas sign in through a real
    daphne, which hashes with the production settings and could not check an MD5 hash."""


def replace(text, old, new):
    assert old in text, f"docs/deploy/nginx-kvmweb.conf no longer contains {old!r}"
    return text.replace(old, new)


@pytest.fixture
def proxy(processes, tmp_path):
    """Two daphnes behind the documented site; returns (https_port, http_port)."""
    daphnes = [processes.daphne(f"daphne-{i}", **WEB_ENV) for i in (1, 2)]
    https_port, http_port = free_port(), free_port()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={NAME}"]
        + ["-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True,
        capture_output=True,
    )
    site = SITE.read_text()
    site = replace(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    site = replace(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
    site = "\n".join(line for line in site.splitlines() if "listen [::]" not in line)
    site = replace(site, "/etc/ssl/kvmweb/fullchain.pem", str(tmp_path / "cert.pem"))
    site = replace(site, "/etc/ssl/kvmweb/privkey.pem", str(tmp_path / "key.pem"))
    site = replace(site, "server 127.0.0.1:8001 ", f"server 127.0.0.1:{daphnes[0].port} ")
    site = replace(site, "server 127.0.0.1:8002 ", f"server 127.0.0.1:{daphnes[1].port} ")
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"""
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log notice;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    access_log {tmp_path}/nginx-access.log;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/site.conf;
}}
"""
    )
    nginx = ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    check = subprocess.run([*nginx, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = processes.start([*nginx, "-g", "daemon off;"], "nginx")
    wait_port(https_port, proc)
    return https_port, http_port


def tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the throwaway self-signed certificate
    return context


def request(port, method, path, *, secure=True, headers=None, body=None):
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, context=tls(), timeout=15)
        if secure
        else http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    )
    conn.request(method, path, body=body, headers={"Host": NAME, **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def cookie(response, name):
    for header in response.headers.get_all("Set-Cookie") or []:
        if header.startswith(f"{name}="):
            return header.split(";", 1)[0].split("=", 1)[1], header
    return None, None


def test_it_redirects_plain_http_to_https(proxy):
    _https, http_port = proxy
    response, _ = request(http_port, "GET", "/vms/?x=1", secure=False)
    assert response.status == 301
    assert response.headers["Location"] == f"https://{NAME}/vms/?x=1"


def test_it_signs_in_over_the_proxy_with_secure_cookies(proxy, operator):
    https_port, _ = proxy
    page, _ = request(https_port, "GET", "/login/")
    assert page.status == 200
    assert page.headers["Strict-Transport-Security"].startswith("max-age=")
    csrf, csrf_header = cookie(page, "csrftoken")
    assert "Secure" in csrf_header  # X-Forwarded-Proto: https reached Django
    response, body = request(
        https_port,
        "POST",
        "/login/",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"csrftoken={csrf}",
            "Origin": f"https://{NAME}",
            "Referer": f"https://{NAME}/login/",
        },
        body=urlencode({"username": "operator", "password": PASSWORD, "csrfmiddlewaretoken": csrf}),
    )
    assert response.status == 302, body[:500]
    session, session_header = cookie(response, "sessionid")
    assert session and "Secure" in session_header and "HttpOnly" in session_header


def test_it_upgrades_websockets_through_the_proxy_and_streams_progress(proxy, client, operator):
    https_port, _ = proxy
    job = make_job()
    client.force_login(operator)
    cookies = {"sessionid": client.cookies["sessionid"].value}

    async def scenario():
        sockets = [
            await WebSocket.connect(
                "127.0.0.1",
                https_port,
                f"/ws/jobs/{job.pk}/",
                cookies=cookies,
                ssl=tls(),
                host_header=NAME,
                origin=f"https://{NAME}",
            )
            for _ in range(4)  # least_conn spreads them over both daphnes
        ]
        snapshots = [await asyncio.wait_for(ws.recv(), 15) for ws in sockets]
        assert all(int(SEQ.search(s).group(1)) == job.progress_seq for s in snapshots)
        await asyncio.sleep(1.0)
        seq, _ = await asyncio.to_thread(write_progress, job.pk, "through-nginx")
        await asyncio.wait_for(
            asyncio.gather(*(wait_for_seq(ws, seq, "through-nginx") for ws in sockets)), 15
        )
        for ws in sockets:
            await ws.close()

    asyncio.run(scenario())


def test_it_refuses_a_websocket_from_a_foreign_origin_through_the_proxy(proxy, client, operator):
    https_port, _ = proxy
    job = make_job()
    client.force_login(operator)

    async def scenario():
        return await WebSocket.connect(
            "127.0.0.1",
            https_port,
            f"/ws/jobs/{job.pk}/",
            cookies={"sessionid": client.cookies["sessionid"].value},
            ssl=tls(),
            host_header=NAME,
            origin="https://evil.example.net",
        )

    from tests.scaleout.wsclient import HandshakeError

    with pytest.raises(HandshakeError, match="403"):
        asyncio.run(scenario())


def test_it_answers_health_through_the_proxy(proxy):
    https_port, _ = proxy
    response, body = request(https_port, "GET", "/health/?scope=web")
    assert response.status == 200
    assert re.search(rb'"database": "ok"', body)
    assert re.search(rb'"channel_layer": "ok"', body)
