#!/usr/bin/env bash
# Install what kasou needs on a Debian 12 host, idempotently: QEMU and the tools
# the guest images are built with (Debian packages), and a virtual environment
# in .venv with kasou and its Python dependencies. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "error: run as root (kasou manages QEMU processes, disks and, later, network devices)" >&2
  exit 1
fi

PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs ca-certificates etcd-server etcd-client iproute2 procps)
PACKAGES+=(systemd)  # systemd-analyze verify checks kasou's units (packaging/systemd), also where PID 1 is not systemd
PACKAGES+=(novnc chromium fonts-noto-cjk)  # the web console's noVNC (served at /ui/novnc/), the browser the UI tests drive, and a Japanese font for it (else every Japanese label is a row of empty boxes)
# The debian image (kasou image build debian): mmdebstrap installs Debian 12 from the host's mirror, and the
# GPT disk is made in a plain file (sfdisk, mkfs.fat + mtools, mke2fs -d). A few MB together.
PACKAGES+=(mmdebstrap fdisk dosfstools mtools)
PACKAGES+=(grub-pc-bin xorriso mtools)  # the import tests make a BIOS-bootable disk of the tiny guest (grub-mkrescue)
PACKAGES+=(libpango-1.0-0 libpangoft2-1.0-0)  # WeasyPrint (kasou[planner]) prints the planner's report to PDF
PACKAGES+=(groff-base)  # the tests check the manual pages kasou man writes
PACKAGES+=(postgresql-client)  # bench/pg_failover.py: the database client on the lab network
PACKAGES+=(restic)  # bench/backup_server.py: the backup engine kasou's backup server is measured beside
PACKAGES+=(ovmf swtpm swtpm-tools)  # UEFI firmware (--firmware uefi, uefi-secure) and each VM's TPM 2.0 (--tpm)
# Debian's installer (kernel and initrd, about 60 MB): the ISO test makes a bootable installer disc of it
PACKAGES+=(debian-installer-12-netboot-amd64)
# Directory sign-in's tests (marker directory): a Samba AD domain controller and OpenLDAP's slapd, each started by
# the tests in a namespace of its own; the distribution's own services are kept from starting (below).
PACKAGES+=(samba samba-ad-dc samba-ad-provision slapd ldap-utils)  # samba-ad-provision: samba-tool domain provision's files (only recommended)
DIRECTORY_SERVICES=(samba-ad-dc smbd nmbd winbind slapd)
PACKAGES+=(${KASOU_EXTRA_PACKAGES:-})
python3 -c 'import ensurepip, venv' 2>/dev/null || PACKAGES+=(python3-venv python3-pip)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The tiny image downloads Debian's cloud kernel package: apt's lists must exist.
lists=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -n1)
if [ ${#missing[@]} -gt 0 ] || [ -z "$lists" ]; then
  echo "installing Debian packages: ${missing[*]:-(refreshing package lists)}"
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    # No service may start during the install (slapd and samba would listen on the host's LDAP ports): a
    # policy-rc.d of our own for its length, unless the host has one already (then it stays as it was).
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\n# kasou install.sh: no service starts during the install\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      own_policy=1
    fi
    trap '[ -n "${own_policy:-}" ] && rm -f /usr/sbin/policy-rc.d' EXIT
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
    own_policy=
  fi
fi
# The distribution's directory services stay off (the tests start their own); neither at boot.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  for unit in "${DIRECTORY_SERVICES[@]}"; do
    if systemctl list-unit-files "$unit.service" >/dev/null 2>&1; then
      systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
    fi
  done
fi

# The virtual environment, reinstalled only when pyproject.toml changes.
stamp=.venv/.kasou-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing Python packages into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,planner]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c 'import kasou, qemu.qmp, fastapi, typer' 
  echo "$want" > "$stamp"
fi
