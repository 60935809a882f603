#!/usr/bin/env bash
# Build kasou's Debian package (Debian 12, amd64) from this checkout with dpkg-deb:
#   /opt/kasou          a virtual environment (Debian's python3.11) with the wheel of this checkout
#                       and its dependencies from the Python package index (pip's cache makes a
#                       rebuild fast); /usr/bin/kasou links to its command
#   /lib/systemd/system kasou-agent.service, kasou-api.service, kasou-guests.service, kasou-backup-server.service,
#                       kasou-etcd.service (a cluster's etcd member: kasou cluster init/join)
#   /etc/kasou          kasou.env (the services' environment, commented) and backup-server.env; postinst
#                       makes kasou.toml (the settings file) from /usr/share/kasou/kasou.toml.example
#   /usr/share/doc/kasou the README and docs/
#   /usr/share/man/man1 kasou.1.gz and a page per command (kasou man)
# Usage: scripts/build-deb.sh [OUTDIR]   (default: dist/). Prints the path of the .deb.
# KASOU_DEB_REVISION (default 1) is the Debian revision; KASOU_DEB_PYTHON the interpreter
# (default /usr/bin/python3, Debian's: the package depends on it). Needs no root.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE  # a developer's checkout on the path would stand in for the wheel
src=$PWD
out=$(realpath -m "${1:-dist}")
python=$(readlink -f "${KASOU_DEB_PYTHON:-/usr/bin/python3}")  # python3.11 itself: the package depends on it
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
debversion="$version-${KASOU_DEB_REVISION:-1}"
arch=$(dpkg --print-architecture)

work=$(mktemp -d "${TMPDIR:-/tmp}/kasou-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
venv=$root/opt/kasou

# The wheel of this checkout, then a virtual environment with it and its dependencies.
"$python" -m venv "$work/build"
"$work/build/bin/pip" -q --disable-pip-version-check wheel --no-deps -w "$work/wheels" "$src" 2>&1 | grep -v '^WARNING: Location' || true
wheel=$(ls "$work"/wheels/kasou-*.whl)
"$python" -m venv "$venv"
"$venv/bin/pip" -q --disable-pip-version-check install --no-compile "$wheel" 2>&1 | grep -v '^WARNING: Location' || true
"$venv/bin/python" -c 'import kasou.cli.main, kasou.agent.server, kasou.api.server, kasou.vault.app'
test -x "$venv/bin/kasou" || { echo "error: the wheel did not install the kasou command" >&2; exit 1; }
# pip is left out of the installed environment (kasou is upgraded as a whole, with the package).
"$venv/bin/python" -m pip -q --disable-pip-version-check uninstall -y pip setuptools >/dev/null 2>&1 || true
# Of the commands, only kasou's (and the interpreter's links): no fastapi, uvicorn, qmp-shell ... on PATH.
find "$venv/bin" -mindepth 1 -not -name kasou -not -name 'python*' -delete
# Debug symbols of the dependencies' compiled modules are of no use on a hospital's server.
if command -v strip >/dev/null; then find "$venv" -name '*.so' -type f -exec strip --strip-unneeded {} +; fi
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -f "$venv"/lib/python*/site-packages/kasou-*.dist-info/direct_url.json  # names the build directory
# A virtual environment names its own path: make it /opt/kasou (scripts' #! lines, pyvenv.cfg).
grep -rlI --null -F "$venv" "$venv" | xargs -0 -r sed -i "s|$venv|/opt/kasou|g"
if grep -rqI -F "$work" "$venv"; then
  echo "error: the build directory is still named in: $(grep -rlI -F "$work" "$venv" | head -3)" >&2
  exit 1
fi

install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/kasou" "$root/usr/share/doc/kasou/docs" "$root/usr/share/kasou"
ln -s /opt/kasou/bin/kasou "$root/usr/bin/kasou"
# The manual pages, generated from the command line itself (man kasou, man kasou-vm-start), compressed as
# Debian's policy asks (gzip -n: no time stamp, so a rebuild gives the same files).
install -d "$root/usr/share/man/man1"
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m kasou man --out "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
install -m 0644 packaging/systemd/*.service "$root/lib/systemd/system/"
install -m 0644 packaging/kasou.env packaging/backup-server.env "$root/etc/kasou/"
install -m 0644 README.md "$root/usr/share/doc/kasou/"
# The settings file's example: postinst installs it as /etc/kasou/kasou.toml where there is none (not a
# conffile: an upgrade never touches the file; docs/configuration.md).
install -m 0644 packaging/kasou.toml.example "$root/usr/share/kasou/"
install -m 0644 packaging/kasou.toml.example "$root/usr/share/doc/kasou/"
install -m 0644 docs/*.md "$root/usr/share/doc/kasou/docs/"
ln -s docs/install.md "$root/usr/share/doc/kasou/install.md"
ln -s docs/backup-server.md "$root/usr/share/doc/kasou/backup-server.md"
cat > "$root/usr/share/doc/kasou/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: kasou
Comment: /opt/kasou holds kasou and its Python dependencies from the Python package
 index; each dependency's license is in its *.dist-info directory there.

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPY
printf 'kasou (%s) stable; urgency=medium\n\n  * Built from %s.\n\n -- kasou <kasou@localhost>  %s\n' \
  "$debversion" "$(git -C "$src" describe --always --dirty 2>/dev/null || echo 'a source tree')" "$(date -R)" \
  | gzip -9n > "$root/usr/share/doc/kasou/changelog.Debian.gz"

install -d "$root/DEBIAN"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"
printf '/etc/kasou/kasou.env\n/etc/kasou/backup-server.env\n' > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: kasou
Version: $debversion
Architecture: $arch
Maintainer: kasou <kasou@localhost>
Installed-Size: $size
Depends: python$pyver, python3 (>= $pyver~), libc6 (>= 2.28), qemu-system-x86, qemu-utils, iproute2, procps, ca-certificates, init-system-helpers (>= 1.54~)
Recommends: ovmf, swtpm, swtpm-tools, novnc, etcd-server, etcd-client, busybox-static, cpio, e2fsprogs, fuse3
Suggests: virt-v2v, nbdkit
Section: admin
Priority: optional
Homepage: https://example.invalid/kasou
Description: server and desktop virtualization for hospital information systems
 kasou runs a hospital's department systems (medical records, PACS, lab,
 pharmacy) as QEMU virtual machines on a few ordinary servers: a host agent
 per server, a control plane with a REST API, web UI and CLI, live migration,
 high availability, mirrored disks and backups that survive an attack.
 .
 The services are systemd units (kasou-agent, kasou-api, and
 kasou-backup-server for the backup server's machine); stopping or
 restarting them, and upgrading this package, never stops a virtual machine.
CONTROL
mkdir -p "$out"
deb="$out/kasou_${debversion}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz -z6 --build "$root" "$deb" >/dev/null
echo "$deb"
