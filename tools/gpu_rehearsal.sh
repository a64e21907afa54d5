#!/usr/bin/env bash
# Rehearse the device command on this machine's CPU, in an environment like a GPU node's (README,
# "Air-gapped GPU nodes"): a few minutes, no GPU, no index needed after step 2.
#
#   bash tools/gpu_rehearsal.sh
#
# 1. .gpu/rehearsal/venv: a venv of this Python without the system's packages, into which only what a GPU
#    node brings is linked: PyTorch with everything it needs, pluggy, PyYAML, tensorboard, tqdm, scipy,
#    pytest, pip, setuptools. No pydantic, no matplotlib.
# 2. the wheels for this Python (tools/offline_wheels.sh -> .gpu/rehearsal/wheels), and the same without
#    matplotlib and what only it needs (.gpu/rehearsal/wheels-no-matplotlib);
# 3. before any install, gpu_check's environment part must name pydantic and matplotlib as missing;
# 4. with every wheel but matplotlib's, `tools/gpu_run.sh --dry-run`: the parts that train must say at once
#    that matplotlib is missing (ssltrain's evaluations draw figures with it), the others must work;
# 5. with every wheel, `tools/gpu_run.sh --dry-run` again, offline (PIP_NO_INDEX): the device command itself.
# Reports land in .gpu/rehearsal/out-*; the script stops at the first step that does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
R=${REHEARSAL_DIR:-.gpu/rehearsal}
NODE_PACKAGES="torch torchvision pluggy pyyaml tensorboard tqdm scipy pytest pip setuptools wheel"
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
rm -rf "$R"
mkdir -p "$R"

echo "[rehearsal] 1. $R/venv: Python $PYVER with only $NODE_PACKAGES (and what they need)"
"$PYTHON" -m venv --without-pip "$R/venv"  # pip and setuptools: this interpreter's, as below
SITE=$("$R/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" - "$SITE" $NODE_PACKAGES <<'EOF'
"""Put the distributions of the given names, and everything they require, from this interpreter into SITE:
the large ones that pip will not touch as links, the others as copies (pip may upgrade those, and an upgrade
through a link would change this interpreter's own packages)."""
import importlib.metadata as md, os, shutil, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

site, todo, seen = sys.argv[1], list(sys.argv[2:]), set()
while todo:
    name = canonicalize_name(todo.pop())
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    todo += [Requirement(r).name for r in dist.requires or []
             if not Requirement(r).marker or Requirement(r).marker.evaluate({"extra": ""})]
    link = name in ("torch", "triton", "scipy", "numpy", "sympy", "networkx") or name.startswith(("nvidia-", "cuda-"))
    for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
        source, target = str(dist.locate_file(top)), os.path.join(site, top)
        if not os.path.exists(source) or os.path.lexists(target):
            continue
        if link:
            os.symlink(os.path.abspath(source), target)
        elif os.path.isdir(source):
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
print(f"[rehearsal] {len(seen)} distributions: {' '.join(sorted(seen))}")
EOF
if "$R/venv/bin/python" -c "import pydantic" 2>/dev/null || "$R/venv/bin/python" -c "import matplotlib" 2>/dev/null; then
    echo "[rehearsal] the venv must have neither pydantic nor matplotlib" >&2
    exit 1
fi

echo "[rehearsal] 2. wheels for Python $PYVER"
bash tools/offline_wheels.sh "$PYVER" "$R/wheels" 2>&1 | grep -v "^WARNING: Location"
mkdir -p "$R/wheels-no-matplotlib"
for name in pydantic pydantic_core annotated_types typing_extensions typing_inspection setuptools wheel; do
    cp "$R/wheels/$name"-[0-9]*.whl "$R/wheels-no-matplotlib/"
done
grep -E "^(#|pydantic|annotated-types|typing-|setuptools|wheel)" "$R/wheels/requirements.txt" \
    >"$R/wheels-no-matplotlib/requirements.txt"

echo "[rehearsal] 3. before the install: the environment part names what is missing"
"$R/venv/bin/python" tools/gpu_check.py --dry-run --parts environment --out "$R/out-bare" >/dev/null || true
grep -q "package pydantic,MISSING" "$R/out-bare/environment.csv" && grep -q "package matplotlib,MISSING" "$R/out-bare/environment.csv"
grep "MISSING\|importable" "$R/out-bare/environment.csv"

export PIP_NO_INDEX=1  # from here on, as on the node: no index
LEADERBOARD=${LEADERBOARD:-configs/mixmatch_fashion_mnist.yaml}  # Fashion-MNIST at 4 steps: the real data path
check_report() {  # every part worked: ssltrain imported, no CUDA test failed or left out, every bench row timed
    local out=$1
    sed -n '/^| part |/,/^$/p' "$out/report.md"
    if grep -q "^| [a-z_]* | failed" "$out/report.md" || ! grep -q "ssltrain importable,yes" "$out/environment.csv" ||
        grep -q ",failed,\|,not run" "$out/cuda_tests.csv" || grep -q ",failed" "$out/throughput.csv" ||
        ! grep -q "^| leaderboard | done" "$out/report.md"; then
        echo "[rehearsal] something did not work: see $out/report.md and $out/log.txt" >&2
        exit 1
    fi
}
echo "[rehearsal] 4. every wheel but matplotlib's, then the device command as a dry run"
OUT=$R/out-no-matplotlib PYTHON=$R/venv/bin/python WHEELS=$R/wheels-no-matplotlib \
    bash tools/gpu_run.sh --dry-run --leaderboard-configs "$LEADERBOARD" >"$R/no-matplotlib.log" 2>&1 || true
out=$R/out-no-matplotlib
sed -n '/^| part |/,/^$/p' "$out/report.md"
grep -q "package matplotlib,MISSING" "$out/environment.csv" && grep -q "ssltrain importable,yes" "$out/environment.csv"
grep -q "^| throughput | failed: RuntimeError: every training here needs matplotlib" "$out/report.md"
grep -q "^| leaderboard | failed: RuntimeError: every training here needs matplotlib" "$out/report.md"
grep -q "test_process_group_of_size_one,passed" "$out/cuda_tests.csv"  # the tests that do not train pass

echo "[rehearsal] 5. every wheel, then the device command as a dry run"
OUT=$R/out PYTHON=$R/venv/bin/python WHEELS=$R/wheels bash tools/gpu_run.sh --dry-run --leaderboard-configs "$LEADERBOARD" \
    >"$R/full.log" 2>&1 || true
"$R/venv/bin/python" -c "import pydantic, matplotlib; print('[rehearsal] installed offline: pydantic', pydantic.VERSION, 'matplotlib', matplotlib.__version__)"
check_report "$R/out"
echo "[rehearsal] done: reports in $R/out-no-matplotlib and $R/out"
