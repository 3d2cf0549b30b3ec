#!/usr/bin/env bash
# scripts/gpu_check.py on the device machine (benchmarks/README.md): install the wheels carried in .whl/ (the
# packages its image lacks), run the check, and leave what should come back in $OUT: gpu_check.md (the dated
# section to append to benchmarks/RESULTS.md), gpu_check.log (the whole output) and each part's log.
#   bash scripts/gpu_check.sh [gpu_check.py arguments, e.g. --parts fsdp,memory]
# Without $OUT (your own GPU machine) the section is appended to benchmarks/RESULTS.md itself.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPU_CHECK_COMMAND="bash scripts/gpu_check.sh${*:+ $*}"  # the command the table records
if [ -n "${OUT:-}" ]; then
  python3 scripts/gpu_check.py --results "$OUT/gpu_check.md" --log-dir "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
  python3 scripts/gpu_check.py "$@"
fi
