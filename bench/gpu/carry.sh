#!/usr/bin/env bash
# Download the wheels a GPU device run of bench/gpu_lora_throughput.py carries, and check them.
#
# Usage:  bench/gpu/carry.sh OUT_DIR          e.g.  bench/gpu/carry.sh .whl
#   then name OUT_DIR in the device call's `carry` (.whl is ignored by .gitignore, so it travels once);
#   `python bench/gpu_lora_throughput.py --dryrun` prints the device command that installs them.
#
# Reads bench/gpu/carry.txt (NAME==VERSION [drop=PATH]... # why). For each pin not yet in OUT_DIR:
# the cp312 manylinux x86-64 or py3-none-any wheel from the index, or, for a pure-python package the
# index has only as an sdist, a wheel built from it. Then bench/gpu/carry.py verify: removes any other
# version, applies the drops, checks wheels + working tree <= 64 MiB (naming the largest wheels if
# not), runs pip's dry run of the device's --no-deps install for cp312 manylinux, resolves every
# carried wheel's requirements against the carried set and the image's packages (image_packages.txt,
# carry_accepted.txt), and writes bench/gpu/carry_report.json. Needs the package index; PYTHON
# (default python3) must have pip and packaging.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bench/gpu/carry.sh OUT_DIR   (e.g. .whl; then carry it in the device call)" >&2
    exit 2
fi
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-python3}
if ! "$py" -c "import packaging, pip" 2>/dev/null; then
    echo "carry: $py lacks pip or packaging (set PYTHON to an interpreter that has both)" >&2
    exit 1
fi
mkdir -p "$out"

# pip matches manylinux_2_N exactly: offer every N the image's glibc (2.39, Ubuntu 24.04) runs.
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done

missing=$("$py" "$here/carry.py" missing "$out")
for spec in $missing; do
    echo "carry: $spec"
    if ! "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$out" "$spec" 2>/dev/null; then
        # No wheel for cp312 on the index: build one from the sdist (verify refuses it unless it is pure Python).
        "$py" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$out" "$spec"
    fi
done
"$py" "$here/carry.py" verify "$out"
