#!/usr/bin/env bash
# Wheels of compare_peers.py's peers for a machine without the package registry: the lent GPU machine,
# x86-64 with CPython 3.12 and torch, numpy and Cython of its own. Writes them to .whl/ (ignored by git):
#
#   learn2learn 0.2.0   built here for CPython 3.12 from its sdist (l2l_source.sh, as setup_peers.sh)
#   higher 0.2.1        downloaded (pure Python)
#   TorchOpt 0.7.3      downloaded for cp312 manylinux, with optree, which that machine lacks
#   parallel-metalearn 0.5.6  downloaded (pure Python; the modules the recipe imports need torch alone)
#
# Nothing is vendored: every file comes from the package registry. Needs python3.12 here (PYTHON312).
# There, with .whl carried and metagrad's src on the path:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:src python3 benchmarks/compare_peers.py --peers-here --device cuda --threads default
#
# Usage: bash benchmarks/device_peer_wheels.sh        # about a minute; idempotent (a wheel present is kept)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.whl"
python312="${PYTHON312:-python3.12}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
grep -qx '/.whl/' "$root/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$root/.git/info/exclude"

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
download() {  # download NAME==VERSION: one cp312 x86-64 wheel into .whl/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$out" "$1"
}
download "higher==0.2.1"
download "torchopt==0.7.3"
download "optree==0.14.1"
download "parallel-metalearn==0.5.6"

if ! ls "$out"/learn2learn-0.2.0-cp312-*.whl >/dev/null 2>&1; then
    source "$root/benchmarks/l2l_source.sh"
    "$python312" -m venv "$work/venv"
    "$work/venv/bin/python" -m pip --disable-pip-version-check -q install "cython<3" setuptools wheel
    src="$(l2l_source "$work/venv" "$work")"
    "$work/venv/bin/python" -m pip --disable-pip-version-check -q wheel --no-deps --no-build-isolation \
        -w "$out" "$src"
fi
ls -1 "$out"
