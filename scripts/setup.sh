#!/usr/bin/env bash
# setup.sh run|test — idempotent setup for `make run` and `make test`.
# As root it apt-installs what is missing; it (re)builds .venv only when requirements
# change; it migrates the database. A second run takes a few seconds and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-run}

# Packages: building libvirt-python needs libvirt-dev, pkg-config and gcc. The test
# profile adds the lab (real libvirtd + QEMU), Chromium for browser tests, PostgreSQL
# and Redis for the scale-out tests, nginx to test the deployment guide's proxy site.
# iptables lets the lab play a firewall that drops the migration ports (tests/hosts/test_reach_lab.py).
APT_RUN="libvirt-dev pkg-config gcc libvirt-clients gettext"
APT_TEST="$APT_RUN libvirt-daemon-system qemu-system-x86 qemu-utils bindfs fuse3 tini binutils openssh-client chromium postgresql redis-server nginx iptables"
want=$APT_RUN
[ "$PROFILE" = test ] && want=$APT_TEST
missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "setup: missing Debian packages:$missing"
    echo "       run as root once, or: sudo apt-get install$missing"
    exit 1
  fi
fi

# The lab's per-host sshd (lab/sshd.py): openssh-server is unpacked with `dpkg -x`, never
# installed, so no system sshd is started or enabled on this machine.
OPENSSH=${KVMWEB_LAB_OPENSSH_DIR:-/var/cache/kvmweb-lab/openssh}
if [ "$PROFILE" = test ] && [ "$(id -u)" = 0 ] && [ ! -x /usr/sbin/sshd ] && [ ! -x "$OPENSSH/root/usr/sbin/sshd" ]; then
  echo "setup: unpacking openssh-server for the lab into $OPENSSH (no service is started)"
  mkdir -p "$OPENSSH"
  debs="openssh-server openssh-sftp-server libwrap0"
  (cd "$OPENSSH" && { apt-get download -qq $debs 2>/dev/null || { apt-get update -qq && apt-get download -qq $debs; }; })
  for deb in "$OPENSSH"/*.deb; do dpkg -x "$deb" "$OPENSSH/root"; done
fi

REQ=requirements.txt
[ "$PROFILE" = test ] && REQ=requirements-dev.txt
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
fi
stamp=".venv/.stamp-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)-$PROFILE"
if [ ! -e "$stamp" ] && ! { [ "$PROFILE" = run ] && ls .venv/.stamp-*-test >/dev/null 2>&1 && [ -e "${stamp%-run}-test" ]; }; then
  echo "setup: installing Python packages from $REQ"
  .venv/bin/pip install -q --disable-pip-version-check -r "$REQ"
  touch "$stamp"
fi

if [ "$PROFILE" = run ]; then
  umask 077 # the database and keys are private (docs/security.md)
  .venv/bin/python manage.py migrate --noinput -v 0
  .venv/bin/python manage.py ensure_admin
  .venv/bin/python manage.py ensure_schedules -v 0 >/dev/null
fi
echo "setup: ready ($PROFILE)"
