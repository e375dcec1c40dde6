#!/usr/bin/env bash
# A Debian base image made without a registry: debootstrap from this machine's own Debian mirror, then
# `docker import`. For machines that reach a Debian mirror and a PyPI (or mirrors of them) but no image
# registry, where python:3.11-slim, nginx and SeaweedFS's images cannot be pulled (deploy/smoke.py builds
# its stand-ins FROM this image). Run as root:
#
#   bash deploy/offline/base-image.sh [TAG] [ROOTFS]   # default deltaserve-base:bookworm, a temporary folder
#
# The image carries python3 and python3-venv (what the Dockerfile's venv step needs; python:3.11-slim has
# them too) and ca-certificates. Certificates this machine trusts beyond Debian's own (a TLS-inspecting
# proxy's CA in front of the mirrors) are added to its trust store, and PIP_CERT names that store, so pip in
# a build reaches the same mirrors the host does. A ROOTFS that already holds a debootstrapped system is
# reused.
set -euo pipefail
tag=${1:-deltaserve-base:bookworm}
rootfs=${2:-$(mktemp -d "${TMPDIR:-/tmp}/deltaserve-rootfs.XXXXXX")}
suite=${DEBIAN_SUITE:-bookworm}
# The mirror apt uses here (deb822 or one-line sources; commented lines skipped: a snapshot URL in a
# comment is not what apt fetches), else Debian's.
mirror=${DEBIAN_MIRROR:-$(grep -rhvE '^[[:space:]]*#' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n 1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}

if [ ! -f "$rootfs/etc/debian_version" ]; then
    echo "base-image: debootstrap $suite from $mirror into $rootfs" >&2
    nice -n 5 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" "$mirror"
fi

# The host's extra CAs: every certificate of its bundle that Debian's bundle lacks.
python3 - "$rootfs" <<'PY'
import re, sys
from pathlib import Path
root = Path(sys.argv[1])
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host = pem.findall(Path("/etc/ssl/certs/ca-certificates.crt").read_text())
image = set(pem.findall((root / "etc/ssl/certs/ca-certificates.crt").read_text()))
extra = [cert for cert in host if cert not in image]
folder = root / "usr/local/share/ca-certificates"
folder.mkdir(parents=True, exist_ok=True)
for number, cert in enumerate(extra):
    (folder / f"host-{number}.crt").write_text(cert + "\n")
print(f"base-image: {len(extra)} certificate(s) of this machine added", file=sys.stderr)
PY
chroot "$rootfs" update-ca-certificates >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["bash"]' - "$tag"
echo "base-image: $tag ($(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))" >&2
