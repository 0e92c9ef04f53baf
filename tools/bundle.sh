#!/usr/bin/env bash
# A release bundle for line boxes: dist/sortgate-<version>.tar.gz holding the wheel, the pinned
# runtime versions (constraints.txt), the installer, the example config, the systemd unit and the
# udev rules. On the box: tar xf sortgate-<version>.tar.gz && sudo sortgate-<version>/install.py install
#
#   tools/bundle.sh                        # the bundle
#   tools/bundle.sh --wheelhouse aarch64   # ... plus every dependency's wheel for Pi OS (offline boxes;
#                                          #     install with --find-links <bundle>/wheels --no-index)
#   tools/bundle.sh --refresh-constraints  # re-pin tools/constraints.txt from a clean install
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# build from a clean copy of the tracked files: no build/ or egg-info in the checkout
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work"
mkdir -p "$work/dist"
"$PY" -m pip wheel -q --no-deps -w "$work/dist" "$work" >/dev/null
wheel=$(ls "$work"/dist/sortgate-*.whl)
version=$(basename "$wheel" | cut -d- -f2)

if [[ "${1:-}" == "--refresh-constraints" ]]; then
    "$PY" -m venv "$work/venv"
    "$work/venv/bin/pip" install -q "$wheel"
    { sed -n '1,3p' tools/constraints.txt; "$work/venv/bin/pip" freeze --exclude sortgate; } > "$work/c.txt"
    mv "$work/c.txt" tools/constraints.txt
    echo "tools/constraints.txt re-pinned"
    exit 0
fi

out=dist/sortgate-$version
rm -rf "$out" && mkdir -p "$out"
cp "$wheel" tools/constraints.txt tools/install.py config/sortgate.example.toml \
   config/sortgate.sortplan.example.toml systemd/sortgate.service systemd/sortgate-console.service \
   systemd/99-sortgate.rules "$out/"
cp config/plans/example.toml "$out/sortplan.example-plan.toml"
if [[ "${1:-}" == "--wheelhouse" ]]; then
    arch=${2:?--wheelhouse needs an architecture: aarch64 or x86_64}
    # Raspberry Pi OS and Debian bookworm have glibc 2.36: any manylinux wheel up to 2_36 runs there
    platforms=(--platform "manylinux2014_$arch")
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
    "$PY" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
        "${platforms[@]}" -r tools/constraints.txt -d "$out/wheels"
fi
tar -C dist -czf "dist/sortgate-$version.tar.gz" "sortgate-$version"
echo "dist/sortgate-$version.tar.gz"
