#!/usr/bin/env bash
# Everything that needs a GPU, in one short run (a few minutes on one GPU):
# the CUDA tests, the write benchmark on CUDA tensors (both save modes), and the
# training overhead with a checkpoint every 10 steps (target <= 1%).
# Usage: bench/gpu_check.sh [OUTDIR]   (results: OUTDIR/gpu-tests.txt, gpu-write.json/.md)
set -u
out="${1:-bench/out/gpu}"
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  | tee "$out/gpu-env.txt"
timeout 240 python -m pytest -q -p no:randomly tests/gpu -rs 2>&1 | tail -25 | tee "$out/gpu-tests.txt"
timeout 300 python -m bench write --gpu --size 256M,1G,4G --dtype bf16 --repeat 3 \
  --modes none,none+overlap,zstd-1+bg --peers dcp.async_save,safetensors \
  --json "$out/gpu-write.json" 2>&1 | tail -60 | tee "$out/gpu-write.md"
timeout 180 python -m bench train --gpu --size 1G --dtype bf16 --every 10 --steps 40 --repeat 3 \
  --modes none,none+overlap --json "$out/gpu-train.json" 2>&1 | tail -12 | tee "$out/gpu-train.md"
