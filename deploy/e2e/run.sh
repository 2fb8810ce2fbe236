#!/usr/bin/env bash
# make e2e-systemd: boots Debian with systemd under systemd-nspawn (root
# filesystem from debootstrap, cached between runs), installs the package,
# and runs deploy/e2e/in-container.sh inside as a oneshot unit. Needs root.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${CITADEL_E2E_CACHE:-/var/cache/citadel-e2e}
packages=systemd,systemd-sysv,dbus,procps
base=$cache/bookworm-$(echo "$packages" | md5sum | cut -c1-8).tar

if [ "$(id -u)" != 0 ]; then echo "e2e-systemd: run as root (it boots a container)" >&2; exit 1; fi
missing=()
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The newest package (make package names them by version, no spaces).
# shellcheck disable=SC2012
deb=$(ls -t "$repo"/dist/citadel-supervisor_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || { echo "e2e-systemd: no package in dist/ (make package)" >&2; exit 1; }

# The Debian mirror: CITADEL_E2E_MIRROR, else the one the host's apt uses
# (deb822 .sources "URIs:" or a one-line "deb URI bookworm main" entry), so
# a host behind a proxy or a local mirror reaches the same place.
host_mirror() {
	local f uri
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -r "$f" ] || continue
		uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' "$f")
		[ -n "$uri" ] && { echo "${uri%/}"; return; }
	done
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -r "$f" ] || continue
		uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {if ($i !~ /security/) {print $i; exit}; break}}' "$f")
		[ -n "$uri" ] && { echo "${uri%/}"; return; }
	done
	echo http://deb.debian.org/debian
}
mirror=${CITADEL_E2E_MIRROR:-$(host_mirror)}

work=$(mktemp -d /var/tmp/citadel-e2e.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"
if [ ! -f "$base" ]; then
	echo "e2e-systemd: building the Debian root filesystem from $mirror (cached in $cache)"
	debootstrap --variant=minbase --include="$packages" bookworm "$work/base" "$mirror" >"$work/debootstrap.log" 2>&1 ||
		{ tail -20 "$work/debootstrap.log"; exit 1; }
	tar -C "$work/base" -cf "$base.tmp" . && mv "$base.tmp" "$base"
	rm -rf "$work/base"
fi

root=$work/rootfs
mkdir -p "$root" "$work/result"
tar -C "$root" -xf "$base"
cp "$deb" "$root/root/citadel.deb"
install -m 0755 "$repo/bin/fake-vllm" "$root/usr/local/bin/fake-vllm"
install -m 0755 "$repo/deploy/e2e/in-container.sh" "$root/usr/local/sbin/citadel-e2e"
cat >"$root/etc/systemd/system/citadel-e2e.service" <<'UNIT'
[Unit]
Description=citadel-supervisor end-to-end checks
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/citadel-e2e
ExecStopPost=/bin/systemctl poweroff --no-block
UNIT
ln -sf /etc/systemd/system/citadel-e2e.service "$root/etc/systemd/system/multi-user.target.wants/citadel-e2e.service"

echo "e2e-systemd: booting $(basename "$base") with $(basename "$deb")"
start=$(date +%s)
timeout 900 systemd-nspawn -q -D "$root" --boot --register=no --keep-unit --private-network \
	--bind="$work/result:/e2e" >"$work/console.log" 2>&1 || true
cat "$work/result/log" 2>/dev/null || { echo "e2e-systemd: no result; console:"; tail -40 "$work/console.log"; exit 1; }
passed=$(grep -c '^PASS: ' "$work/result/log" || true)
failed=$(grep -c '^FAIL: ' "$work/result/log" || true)
echo "e2e-systemd: $(($(date +%s) - start)) s"
echo "e2e-systemd: $passed passed, $failed failed"
grep -q '^RESULT fail=0 ' "$work/result/log"
