#!/usr/bin/env bash
# Before a GPU check on an air-gapped node (README, "Air-gapped GPU nodes"), here, where pip reaches an index:
#
#   bash tools/gpu_prepare.sh [PYVER]        # the node's Python version, default 3.12
#
# puts into git-ignored folders of the checkout what the node lacks: wheels (tools/offline_wheels.sh ->
# .gpu/wheels) and Fashion-MNIST's four IDX files (-> .gpu/fashion-mnist, from Debian's dataset-fashion-mnist
# or FMNIST_DIR); then checks that the checkout plus both folders fit the 64 MiB a device run carries, and
# prints the device command and its `carry` list.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
LIMIT=$((64 * 1024 * 1024))
bash tools/offline_wheels.sh "$PYVER" .gpu/wheels
mkdir -p .gpu/fashion-mnist
for stem in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    cp "$FMNIST_DIR/$stem.gz" .gpu/fashion-mnist/ 2>/dev/null || cp "$FMNIST_DIR/$stem" .gpu/fashion-mnist/ || {
        echo "[gpu_prepare] $stem(.gz) not in $FMNIST_DIR: apt-get install dataset-fashion-mnist, or set FMNIST_DIR" >&2
        exit 1; }
done
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -sb .gpu/wheels | cut -f1)
data=$(du -sb .gpu/fashion-mnist | cut -f1)
total=$((tree + wheels + data))
echo "[gpu_prepare] travels: checkout $tree + .gpu/wheels $wheels + .gpu/fashion-mnist $data = $total bytes" \
     "($((100 * total / LIMIT))% of 64 MiB)"
if ((total > LIMIT)); then
    echo "[gpu_prepare] over 64 MiB: carry fewer wheels (matplotlib's are the largest) or ignore large untracked files" >&2
    exit 1
fi
echo '[gpu_prepare] device command: bash tools/gpu_run.sh    carry: [".gpu/wheels", ".gpu/fashion-mnist"]'
