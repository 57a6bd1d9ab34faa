#!/usr/bin/env bash
# minivae's GPU suite in one call: gradient checks, a training smoke run with CuPy<->NumPy
# resumes, the step-time benchmark at batch 128 and 4096, and the whole test suite, written
# under $OUT (at most 7 files; see benchmarks/gpu/suite.py). Without a GPU it runs to the end,
# skipping the GPU parts with the reason.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu/run.sh            # add --quick for a plumbing check
#
# With the device tool (see README, "GPU"): carry [".whl"] after bash ../shared/gpu/prepare.sh,
# timeout_s 540, and the command
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; bash benchmarks/gpu/run.sh 2>&1 | tee $OUT/log
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the directory for the results}"
exec "${PYTHON:-python3}" benchmarks/gpu/suite.py --out "$OUT" "$@"
