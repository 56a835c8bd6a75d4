#!/usr/bin/env bash
# The GPU checks of the step-engine issue, as one script for a CUDA machine whose Python already
# has torch (the device tool's image): the CUDA tests, the whole suite, and the step-time
# benchmark on CUDA and on 2 CPU threads. Results go to $OUT (default: gpu-results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" /tmp/ck
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/kfac -e plugins/shampoo -e plugins/kbfgs >/tmp/ck/pip.txt 2>&1 || tail -5 /tmp/ck/pip.txt
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 12 tests plugins --ignore=tests/gpu 2>&1 | tail -25 > "$OUT/suite.txt"
tail -3 "$OUT/suite.txt"
timeout 230 python3 -m benchmarks.steptime --device cuda --rounds 2 --budget-minutes 3.3 --no-peers --no-progress --out /tmp/ck/cuda >/tmp/ck/cuda.log 2>&1 &
timeout 230 python3 -m benchmarks.steptime --device cpu --threads 2 --rounds 1 --budget-minutes 3.3 --no-peers --no-progress --out /tmp/ck/cpu >/tmp/ck/cpu.log 2>&1 &
wait
for d in cuda cpu; do
  cp /tmp/ck/$d/table.txt "$OUT/steptime_${d}_table.txt" 2>/dev/null || tail -20 /tmp/ck/$d.log > "$OUT/steptime_${d}_table.txt"
  cp /tmp/ck/$d/steptime.json "$OUT/steptime_${d}.json" 2>/dev/null
  tail -40 /tmp/ck/$d.log
done
