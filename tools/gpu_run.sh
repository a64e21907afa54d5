#!/usr/bin/env bash
# The GPU check on an air-gapped GPU node, as one command run in the checkout (README, "Air-gapped GPU nodes"):
#
#   bash tools/gpu_run.sh [tools/gpu_check.py options]     e.g. --parts leaderboard, or --dry-run to rehearse
#
# 1. installs the carried wheels (.gpu/wheels, from tools/gpu_prepare.sh) and ssltrain offline: pip keeps what
#    the node has when it satisfies the constraints in .gpu/wheels/requirements.txt; where site-packages is
#    not writable, everything goes to .gpu/site instead (on PYTHONPATH);
# 2. runs tools/gpu_check.py --out "$OUT" (default .gpu/out) with a budget that ends the whole command about
#    9 minutes after it started (BUDGET_S=... to change). gpu_check finds the carried Fashion-MNIST files in
#    .gpu/fashion-mnist (else the next dataset it can find, and says which).
# Environment: OUT, PYTHON (default python3), WHEELS (default .gpu/wheels), TOTAL_S (the whole command's
# seconds, default 540) or BUDGET_S (gpu_check's, default what TOTAL_S leaves after the install).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu/out}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.gpu/wheels}
TOTAL_S=${TOTAL_S:-540}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.gpu/inductor-cache}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PIP=("$PYTHON" -m pip install --quiet --no-index --no-compile --disable-pip-version-check)

install_offline() {
    echo "[gpu_run] $(date -u +%FT%TZ) $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"), in $PWD"
    if [[ -f $WHEELS/requirements.txt ]]; then
        if ! "${PIP[@]}" --find-links "$WHEELS" --no-deps -r "$WHEELS/requirements.txt"; then
            echo "[gpu_run] installing the wheels into .gpu/site instead (on PYTHONPATH)"
            "${PIP[@]}" --find-links "$WHEELS" --no-deps --target .gpu/site --upgrade -r "$WHEELS/requirements.txt" &&
                export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
        fi
    else
        echo "[gpu_run] no $WHEELS/requirements.txt: no wheels carried (tools/gpu_prepare.sh makes them)"
    fi
    "${PIP[@]}" --no-build-isolation --no-deps -e . ||
        "${PIP[@]}" --no-build-isolation --no-deps --target .gpu/site --upgrade . ||
        echo "[gpu_run] ssltrain could not be installed: gpu_check reports what is missing"
    "$PYTHON" -c "import ssltrain, pydantic; print('[gpu_run] ssltrain', ssltrain.__file__, 'pydantic', pydantic.VERSION)"
}

install_offline >>"$LOG" 2>&1  # not in a pipeline: PYTHONPATH must reach gpu_check
tail -n 4 "$LOG"
BUDGET_S=${BUDGET_S:-$((TOTAL_S - SECONDS - 15))}
echo "[gpu_run] install took ${SECONDS} s; tools/gpu_check.py --budget-s $BUDGET_S $*"
timeout -k 10 $((BUDGET_S + 10)) "$PYTHON" tools/gpu_check.py --out "$OUT" --budget-s "$BUDGET_S" "$@"
code=$?
echo "[gpu_run] exit code $code after ${SECONDS} s; files in $OUT:"
ls -l "$OUT"
exit $code
