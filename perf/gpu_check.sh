#!/usr/bin/env bash
# One-shot GPU validation of xent_triton (< 8 minutes on an H100/H200):
#   1. the machine: nvidia-smi, python / torch / triton / optional peers' versions;
#   2. the test suite on CUDA (python -m pytest -q -rs tests), at most 200 s;
#   3. the linear head vs its paired-cuBLAS floor (python -m perf.linear_gpu: N 2048/4096/8192,
#      D 4096, C 128256, bf16, 0 % and 50 % ignored, peers where importable; paired interleaved
#      medians of 20 iterations; + a run-to-run determinism check) -> linear_gpu.csv, at most 150 s
#      (no new case after 110 s; standalone it has a 240 s case budget); the vendor head and the
#      fused-epilogue head (Triton logits / dX / dW GEMMs) paired -> linear_dispatch.csv;
#   4. a reduced sweep with every installed provider (N 4096/16384, C 32000/128256/262144, bf16;
#      forward+backward and no-grad forward first; new cases stop after 170 s) -> CSV, MD, PNG.
# Everything lands under OUTDIR (env.txt, pytest.txt, sweep.log, sweep.csv, sweep.md, *.png).
#
#   perf/gpu_check.sh OUTDIR            # PYTHON=/path/to/python to choose the interpreter
#
# Exits non-zero, at once and with a clear message, when torch sees no CUDA device; otherwise
# non-zero when the tests or the sweep failed (the sweep's partial CSV is kept either way).
#
# Optional peers on an offline GPU box: on a connected machine with the GPU box's Python version,
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl liger-kernel cut-cross-entropy
# copy .whl/ into the repository root (git-ignored), and on the GPU box this script runs
#   pip install --no-index --no-deps --target .whl/site .whl/*.whl
# and puts .whl/site on PYTHONPATH (torch and triton stay the box's own).
set -u -o pipefail
OUT=${1:?usage: perf/gpu_check.sh OUTDIR}
PY=${PYTHON:-python}
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$(dirname "$0")/.."
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' >/dev/null 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 3 ]; then why="torch sees no CUDA device"; else why="'$PY' cannot import torch"; fi
    echo "gpu_check: FAILED - $why (python: $PY). This script validates the kernels on a GPU;" \
         "on CPU run 'python -m pytest -q -rs tests' and 'python -m perf.sweep --out perf/out'." >&2
    exit 2
fi
mkdir -p "$OUT"
t0=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    echo "== $(date -u '+%Y-%m-%d %H:%M UTC')  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi || echo "(nvidia-smi not found)"
    "$PY" - <<'PYEOF'
import importlib, platform, torch, triton
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"triton {triton.__version__} | {torch.cuda.get_device_name()}")
for mod in ("liger_kernel", "cut_cross_entropy", "tqdm", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', 'installed')}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: not available ({type(e).__name__})")
PYEOF
} 2>&1 | tee "$OUT/env.txt"

echo "== tests on CUDA (limit 200 s)"
timeout 200 "$PY" -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.txt" | tail -25
rc_tests=${PIPESTATUS[0]}

echo "== linear head vs the three cuBLAS GEMMs (limit 150 s)"
timeout 150 "$PY" -m perf.linear_gpu --out "$OUT" --budget-s 110 2>&1 | tee "$OUT/linear_gpu.log" | tail -5
rc_linear=${PIPESTATUS[0]}
[ -f "$OUT/linear_dispatch.csv" ] && { echo "== dispatch table (commit as perf/results/linear_dispatch.csv)"; cat "$OUT/linear_dispatch.csv"; }

echo "== reduced sweep (limit 250 s)"
timeout 250 "$PY" -m perf.sweep --out "$OUT" --quick --modes fwdbwd nograd fwd bwd \
    --time-budget 170 --iters 10 2>&1 | tee "$OUT/sweep.log" | grep -v '^\[gpu sweep' | tail -20
rc_sweep=${PIPESTATUS[0]}
[ -f "$OUT/sweep.md" ] && cat "$OUT/sweep.md"
if [ -f "$OUT/sweep.csv" ]; then  # peers may fail (recorded); our own kernels must not
    "$PY" - "$OUT/sweep.csv" <<'PYEOF' || rc_sweep=1
import csv, sys
bad = [r for r in csv.DictReader(open(sys.argv[1]))
       if r["provider"].startswith("xent_triton") and r["status"].startswith(("error", "oom"))]
for r in bad:
    print("gpu_check: xent_triton failed:", r["kind"], r["mode"], r["dtype"], r["N"], r["C"], r["status"])
sys.exit(1 if bad else 0)
PYEOF
fi

echo "== gpu_check: tests rc=$rc_tests, linear rc=$rc_linear, sweep rc=$rc_sweep, $(( $(date +%s) - t0 )) s; outputs in $OUT"
[ "$rc_tests" -eq 0 ] && [ "$rc_linear" -eq 0 ] && [ "$rc_sweep" -eq 0 ]
