#!/usr/bin/env bash
# Wheels of every ssltrain dependency an air-gapped GPU node may lack, for that node's Python, plus
# DIR/requirements.txt for the offline install (README, "Air-gapped GPU nodes"):
#
#   bash tools/offline_wheels.sh 3.12 .gpu/wheels          # here, where pip reaches an index
#   python -m pip install --no-index --find-links .gpu/wheels --no-deps -r .gpu/wheels/requirements.txt \
#     && python -m pip install --no-index --no-build-isolation --no-deps -e .      # there, offline
#
# What is fetched: the dependencies in pyproject.toml, minus those a GPU node brings with PyTorch
# (PRESENT below), and the build requirements (setuptools, and wheel for setuptools < 70.1, which the
# install with --no-build-isolation uses), with everything they need, as manylinux x86_64 (or pure
# Python) wheels for CPython PYVER; then the PRESENT ones are deleted from DIR again (numpy comes with
# matplotlib's needs).
# requirements.txt lists each wheel in DIR with the version constraints that the project and the other
# wheels put on it (e.g. pydantic-core==X from pydantic, typing-extensions>=Y): pip keeps a package the
# node already has when it satisfies them and installs the carried wheel otherwise, so `--no-deps` is safe.
set -euo pipefail
usage="usage: bash tools/offline_wheels.sh PYVER DIR   (e.g. 3.12 .gpu/wheels)"
PYVER=${1:?$usage}
DIR=${2:?$usage}
PRESENT="torch torchvision pluggy pyyaml tensorboard tqdm scipy numpy"  # on the node with PyTorch (issue 17)
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[[ $PYVER =~ ^3\.[0-9]+$ ]] || { echo "PYVER must look like 3.12, not '$PYVER'" >&2; exit 2; }

mapfile -t WANTED < <("$PYTHON" - "$PRESENT" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python < 3.11: pip's own copy of tomli
    from pip._vendor import tomli as tomllib
present = set(sys.argv[1].split())
project = tomllib.load(open("pyproject.toml", "rb"))
for dep in [*project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"]:
    name = re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower().replace("_", "-")
    if name not in present:
        print(dep)
EOF
)
echo "[offline_wheels] Python $PYVER, manylinux x86_64: ${WANTED[*]} and what they need, into $DIR"
mkdir -p "$DIR"
rm -f "$DIR"/*.whl "$DIR"/requirements.txt
"$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$DIR" \
    --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "${WANTED[@]}"
for name in $PRESENT; do
    rm -f "$DIR/${name//-/_}"-[0-9]*.whl
done

"$PYTHON" - "$DIR" "$PYVER" "${WANTED[@]}" <<'EOF'
"""DIR/requirements.txt: each wheel in DIR with the constraints the project and the other wheels put on it."""
import email.parser, os, sys, zipfile
try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

folder, pyver, top = sys.argv[1], sys.argv[2], sys.argv[3:]
env = {**default_environment(), "python_version": pyver, "python_full_version": f"{pyver}.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
wheels = {canonicalize_name(f.split("-")[0]): f for f in sorted(os.listdir(folder)) if f.endswith(".whl")}
constraints = {name: [] for name in wheels}
requirements = [Requirement(r) for r in top]
for name, file in wheels.items():
    with zipfile.ZipFile(os.path.join(folder, file)) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requirements += [Requirement(r) for r in email.parser.Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []]
for r in requirements:
    name = canonicalize_name(r.name)
    if name in wheels and (r.marker is None or r.marker.evaluate(env)) and str(r.specifier):
        constraints[name].append(str(r.specifier))
with open(os.path.join(folder, "requirements.txt"), "w") as f:
    f.write("# Written by tools/offline_wheels.sh: the carried wheels and the constraints on them. Install offline with\n"
            "#   python -m pip install --no-index --find-links DIR --no-deps -r DIR/requirements.txt\n")
    for name in sorted(wheels):
        f.write(name + ",".join(dict.fromkeys(constraints[name])) + "\n")
EOF
echo "[offline_wheels] $DIR:"
ls -l "$DIR" | awk 'NR > 1 {printf "  %9d  %s\n", $5, $9}'
echo "[offline_wheels] total $(du -cb "$DIR"/*.whl | tail -1 | cut -f1) bytes in $(ls "$DIR"/*.whl | wc -l) wheels"
