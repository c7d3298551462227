#!/usr/bin/env bash
# The GPU checks of issue 9 in one call of a lent GPU machine (Python 3.12 with torch, no MONAI or SimpleITK, no
# network): the GPU tests, the engine benchmark at preset full, the MKD ensemble on a 512x512x300 CT, and prediction
# side by side with nnU-Net v2 on the GPU. Results land in $OUT (JSON and logs).
#
# What it carries, prepared on the development machine (git-ignored folder .gpudata/, 50 MB):
#   gsite.tar.xz   site-packages unpacked from the cp312 wheels of monai, SimpleITK, pydantic (+ core, annotated-types,
#                  typing-inspection), xz-compressed (31 MB instead of 57 MB of wheels)
#   nnsite.tar.xz  nnunetv2 and what its predictor imports that the machine lacks (acvl_utils, batchgenerators,
#                  dynamic_network_architectures, nibabel, blosc2, ndindex)
#   chaos.nii.xz + chaos_ct_case_liver_label.nii.gz   the CHAOS CT (../shared/data/chaos_ct_liver)
# Run as: device run --carry .gpudata 'bash backend/benchmarks/gpu_check.sh'
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
ROOT=$(pwd)
log() { echo "== $(date +%T) $*"; }
step() { local name=$1 limit=$2; shift 2; log "$name (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/steps.log" | tail -40; log "$name rc=${PIPESTATUS[0]}"; }

log unpack
mkdir -p /tmp/site /tmp/nnsite ../shared/data/chaos_ct_liver
tar -xJf .gpudata/gsite.tar.xz -C /tmp/site && tar -xJf .gpudata/nnsite.tar.xz -C /tmp/nnsite || exit 1
xz -dc .gpudata/chaos.nii.xz | gzip -1 > ../shared/data/chaos_ct_liver/chaos_ct_case_liver_image.nii.gz
cp .gpudata/chaos_ct_case_liver_label.nii.gz ../shared/data/chaos_ct_liver/
export PYTHONPATH=/tmp/site:$ROOT/backend
printf '#!/bin/sh\nPYTHONPATH=/tmp/nnsite:$PYTHONPATH exec python3 "$@"\n' > /tmp/nnpy && chmod +x /tmp/nnpy
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, monai, SimpleITK; print('torch', torch.__version__, 'monai', monai.__version__, 'sitk', SimpleITK.Version_VersionString(), torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
B=backend/benchmarks
# 989 TFLOP/s: dense bf16 peak of the H100/H200 SXM datasheet (a bf16 GEMM measured ~790 here, KINDS.md)
[ -z "${SKIP_TESTS:-}" ] && step tests 180 bash -c "cd backend && python3 -m pytest tests/test_gpu.py -v -p no:cacheprovider --durations=0"
step nnunet300 170 python3 $B/bench_vs_nnunet.py --device cuda --slices 300 --rounds 1 --predictions 3 --train-seconds 10 --preset full --nnunet-python /tmp/nnpy --out "$OUT/nnunet_cuda_300.json"
step pipeline300 60 python3 $B/bench_engine.py --preset full --slices 300 --pipeline-only --repeats 3 --out "$OUT/pipeline_300_full.json"
step mkd300_full 80 python3 $B/bench_engine.py --device cuda --preset full --skip-training --predict-method mkd --slices 300 --repeats 3 --out "$OUT/engine_cuda_mkd300_full.json"
step engine_full 120 python3 $B/bench_engine.py --device cuda --preset full --iterations 20 --repeats 1 --peak-tflops 989 --out "$OUT/engine_cuda_full.json"
log done
