#!/usr/bin/env bash
# Install a release bundle into a clean Debian bookworm root and run it there: the check that a
# line box (Raspberry Pi OS is bookworm, Python 3.11) gets a working sortgate from the installer.
#
#   sudo tools/root-check.sh                 # arm64 under qemu-user-static (a Pi 4/5's architecture)
#   sudo tools/root-check.sh --arch amd64    # an empty amd64 root
#   sudo tools/root-check.sh --root DIR      # where the root lives (default /srv/sortgate-root-<arch>);
#                                            # an existing root is reused, its /opt/sortgate replaced
#
# Needs root, debootstrap, and for arm64 qemu-user-static with binfmt_misc (Debian: apt-get install
# debootstrap qemu-user-static binfmt-support). Not part of CI: debootstrap and emulation take
# 10-20 minutes. Under emulation timing means nothing; correctness does.
#
# Two things qemu 7.2 needs for ai-edge-litert 2.3.0 (found the hard way): /proc/cpuinfo inside the
# root must describe an ARM CPU (else the runtime segfaults probing the CPU), so an ARM cpuinfo is
# bind-mounted over it; and QEMU_CPU=cortex-a76 (a Pi 5's core): with SVE ("max") the int8 kernels
# gave wrong answers. Commands run with `env -i` so that no host pip or Python setting leaks in.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=arm64
root=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        *) echo "usage: $0 [--arch arm64|amd64] [--root DIR]" >&2; exit 2 ;;
    esac
done
root=${root:-/srv/sortgate-root-$arch}
[[ $(id -u) -eq 0 ]] || { echo "$0: run as root" >&2; exit 2; }
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ $arch == arm64 && $(uname -m) != aarch64 ]]; then
    command -v qemu-aarch64-static >/dev/null || { echo "$0: needs qemu-user-static" >&2; exit 2; }
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64
fi

if [[ ! -x $root/usr/bin/python3 ]]; then
    echo "== debootstrap $arch bookworm into $root"
    debootstrap --arch "$arch" --variant=minbase \
        --include=python3,python3-venv,mosquitto,ca-certificates,passwd,procps \
        bookworm "$root" "$mirror"
fi

echo "== bundle"
# with every dependency's wheel: the root installs offline (no PyPI, nor the host's CA certificates)
bundle=$(tools/bundle.sh --wheelhouse "$( [[ $arch == arm64 ]] && echo aarch64 || echo x86_64 )" | tail -1)
version=$(basename "$bundle" .tar.gz | cut -d- -f2)
rm -rf "$root/tmp/sortgate-"* && tar -xzf "$bundle" -C "$root/tmp"

cleanup() {
    for m in proc/cpuinfo proc sys dev/pts dev; do
        mountpoint -q "$root/$m" && umount -l "$root/$m" || true
    done
}
trap cleanup EXIT
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
if [[ $arch == arm64 && $(uname -m) != aarch64 ]]; then
    for n in 0 1; do  # a Cortex-A76 (a Pi 5's core), two of them
        printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$n"
    done > "$root/tmp/cpuinfo"
    mount --bind "$root/tmp/cpuinfo" "$root/proc/cpuinfo"
fi

in_root() {
    chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU=cortex-a76 "$@"
}
echo "== in the root: $(in_root uname -m), $(in_root python3 --version)"
in_root rm -rf /opt/sortgate
echo "== install.py install (no systemd in a chroot: --no-system)"
in_root python3 "/tmp/sortgate-$version/install.py" --no-system install \
    --find-links "/tmp/sortgate-$version/wheels" --no-index
sg=/opt/sortgate/current/bin/sortgate
echo "== sortgate --version"
in_root $sg --version
echo "== sortgate check-config /etc/sortgate/sortgate.toml"
in_root $sg check-config /etc/sortgate/sortgate.toml
echo "== sortgate model eval --images 60 --json"
in_root $sg model eval --images 60 --json | tee "$root/tmp/model-eval.json"
echo "== sortgate bench line --parcels 30 --rate 2 --images --json"
in_root $sg bench line --parcels 30 --rate 2 --images --idle-s 0 --json | tee "$root/tmp/bench.json"
python3 - "$root/tmp/bench.json" "$root/tmp/model-eval.json" <<'PY'
import json, sys
bench, model = (json.load(open(p)) for p in sys.argv[1:3])
problems = []
if bench["wrongly_released"] != 0:
    problems.append(f"wrongly_released {bench['wrongly_released']}")
if bench["records_published"] != bench["parcels"]:
    problems.append(f"records {bench['records_published']} of {bench['parcels']}")
if model["images"] != 60:
    problems.append("model eval did not run")
print("root-check:", "FAILED: " + "; ".join(problems) if problems else
      f"OK (parcels {bench['parcels']}, wrongly released 0, records {bench['records_published']}, "
      f"model {model['model']})")
sys.exit(1 if problems else 0)
PY
