#!/usr/bin/env bash
# The GPU checks of issues 6 and 9 in one device call: install the carried wheels, print the versions, then run
#   1. benchmarks/overhead.py --gpu --compile --steps 50  (issue 6: step-time ratios to plain SFT, Qwen2.5-1.5B shape,
#      bf16, LoRA; every base-activation source, eager and compiled; 50 rounds, since the ratios of two 30-round runs
#      on one H200 differed by up to 0.12)
#   2. benchmarks/gpu_smoke.py  (issue 9: FSDP2, ZeRO-2, ZeRO-3 at world size 1 against no wrapper)
# On an H200 (2026-11-27) the 30-round compile run took about 250 s and the smoke test about 100 s.
# Results, JSON and logs, go to $OUT (the device tool's output folder). Prepare .whl here first:
#   bash benchmarks/gpu/fetch_wheels.sh
# then one device call, with .whl carried:
#   run(command="bash benchmarks/gpu/run_checks.sh", carry=[".whl"], timeout_s=590)
# `bash benchmarks/gpu/run_checks.sh --cpu` is the dry run on a CPU machine (small overhead config; gpu_smoke.py --cpu,
# FSDP2 through the test worker's CPU shim, ZeRO on DeepSpeed's CPU accelerator); PYTHON and WHL (the wheel folder)
# can be set for it.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
WHL="${WHL:-.whl}"
OUT="${OUT:-out/gpu_checks}"
# A folder named site-packages: dill (and so datasets' fingerprints) pickles classes of modules from anywhere else
# by value, which fails on pyarrow's.
SITE="$(mktemp -d)/site-packages"
mkdir -p "$OUT"
CPU=0
[[ "${1:-}" == "--cpu" ]] && CPU=1

"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHL"/*.whl || { echo "could not install the wheels in $WHL (run benchmarks/gpu/fetch_wheels.sh here)"; exit 3; }
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "deepspeed", "pyarrow"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, do not stop: the benchmarks say what they need
        print(name, "unavailable:", type(exc).__name__, exc)
import hf_blockem  # fails here, with the reason, if the set is incomplete
print("hf_blockem imports")
PY

status=0
if [[ $CPU == 1 ]]; then
    timeout 300 "$PYTHON" benchmarks/overhead.py --steps 5 --warmup 1 --json "$OUT/overhead_cpu.json" 2>&1 \
        | tee "$OUT/overhead.log" || status=1
    timeout 280 "$PYTHON" benchmarks/gpu_smoke.py --cpu --out "$OUT/gpu_smoke_cpu.json" 2>&1 \
        | tee "$OUT/gpu_smoke.log" || status=1
else
    timeout 360 "$PYTHON" benchmarks/overhead.py --gpu --compile --steps 50 --json "$OUT/overhead_gpu.json" 2>&1 \
        | tee "$OUT/overhead.log" || status=1
    timeout 180 "$PYTHON" benchmarks/gpu_smoke.py --timeout 80 --out "$OUT/gpu_smoke.json" 2>&1 \
        | tee "$OUT/gpu_smoke.log" || status=1
fi
exit $status
