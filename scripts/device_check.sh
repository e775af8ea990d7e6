#!/usr/bin/env bash
# The GPU path in one prepared command (issue: speed): the CUDA tests (tests/test_cuda.py, marked
# `cuda`: projector, the shipped UNet in fp16 / bf16, short paired and BC-DPM runs, 2 ranks over
# NCCL where two GPUs exist) and the published-architecture forward benchmark on the GPU, with a
# summary JSON. Meant for a machine with a CUDA GPU and a CUDA build of torch; well under 8 min.
#   bash scripts/device_check.sh [OUT_DIR]      (default: $OUT when set, else results/device_check)
# PYTHON=... picks the interpreter (default python3: on a lent GPU machine, the one with torch);
# WHEELS=DIR installs what it lacks (nibabel, blobfile, bm3d, ...) from wheels fetched beforehand
# with `pip download -r requirements.txt -d DIR`, no index needed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${1:-${OUT:-results/device_check}}"
python="${PYTHON:-python3}"
mkdir -p "$out"
if [ -n "${WHEELS:-}" ]; then
  "$python" -m pip install --quiet --no-index --find-links "$WHEELS" -r requirements.txt
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'"
status=0
timeout 360 "$python" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
  --junitxml "$out/cuda_tests.xml" 2>&1 | tee "$out/cuda_tests.log" || status=$?
timeout 120 "$python" scripts/benchmark_unet.py --device cuda --repeats 5 --json "$out/benchmark_unet.json" \
  2>&1 | tee "$out/benchmark_unet.log" || status=$?
"$python" - "$out" <<'EOF'
import datetime, json, os, sys
import xml.etree.ElementTree as ET
import torch
out = sys.argv[1]
suite = ET.parse(os.path.join(out, "cuda_tests.xml")).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
bench = os.path.join(out, "benchmark_unet.json")
summary = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), torch=torch.__version__,
               cuda=torch.version.cuda, cuda_tests=tests,
               benchmark_unet=json.load(open(bench))["results"] if os.path.exists(bench) else None)
json.dump(summary, open(os.path.join(out, "device_check.json"), "w"), indent=2)
print(json.dumps({k: v for k, v in summary.items() if k != "benchmark_unet"}))
EOF
exit "$status"
