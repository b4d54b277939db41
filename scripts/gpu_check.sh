#!/usr/bin/env bash
# The one command a lent GPU runs (see docs/benchmarks.md), in about 6-8 minutes on one H100:
#   bash scripts/gpu_check.sh     # log.txt, summary.txt and JSON files in $OUT or ./gpu_check_out
# Uses the PyTorch installed there; packages it lacks (pyautoattack) travel as wheels in the
# git-ignored .whl/ folder and are installed with `pip install --no-index --target`. Steps, each
# with its own time limit so one slow step cannot cost the others' results:
#   1. machine facts; 2. bench_step.py for WRN-34-10, batch 128 and 256, K=5, AWP on (reference
#   fp32 vs ours fp32 / bf16 / bf16+channels_last); 3. bf16-vs-fp32 loss curve; 4. APGD-CE timing
#   on WRN-34-10, 512 points, fp32; 5. the CUDA-marked tests; 6. bf16+channels_last+compile;
#   7. bench_distill.py: each distillation method's step (ResNet-18 student, WRN-34-10 teacher,
#   batch 128, K=10) against TRADES + one teacher forward (not yet run on a GPU);
#   8. the standard-AutoAttack projection for 10,000 points of WRN-34-10 (bench_aa.py: plain,
#   channels_last, bf16 on 64 points; not yet run on a GPU, its time is a guess: it goes last,
#   and steps 1-8 together should stay under the device's 10 minutes per command; the compile
#   variant of bench_aa needs a run of its own); 9. bench_data.py: images/s per loader worker
#   from an image folder and its shards at 224 px, and a 16-worker loader (the node's CPUs; can
#   they feed the GPU?), needs timm, webdataset and wids among the wheels; 10. bench_fast.py:
#   each fast method's step time as a ratio to PGD-AT's (PreAct ResNet-18, batch 128, K=10; run
#   before step 8, which goes last; not yet run on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, append to $OUT/log.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/log.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v '^USDT' | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/log.txt"
    [ "$rc" = 0 ] || failed+=("$name($rc)")
}

step machine 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    python3 -c 'import torch; print(\"torch\", torch.__version__, torch.cuda.get_device_name())'; \
    git log -1 --format='commit %h %cd' 2>/dev/null || true"
BENCH=(python3 scripts/bench_step.py --device cuda --model wrn-34-10 --steps 5 --repeats 10)
step bench_step_b128 120 "${BENCH[@]}" --batch-size 128 --warmup 3 \
    --variants reference,fp32,bf16,bf16-cl --json "$OUT/bench_step_b128.json"
step bench_step_b256 150 "${BENCH[@]}" --batch-size 256 --warmup 3 \
    --variants reference,fp32,bf16,bf16-cl --loss-curve 30 --json "$OUT/bench_step_b256.json"
step apgd_timing 90 python3 scripts/bench_eval.py --apgd-model wrn-34-10 --apgd-points 512 \
    --device cuda --json "$OUT/apgd_timing.json"
step cuda_tests 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step bench_step_compile 200 "${BENCH[@]}" --batch-size 256 --warmup 4 \
    --variants bf16-cl,bf16-cl-compile --json "$OUT/bench_step_compile.json"
step bench_distill 100 python3 scripts/bench_distill.py --device cuda --student resnet-18 \
    --teacher wrn-34-10 --batch-size 128 --steps 10 --repeats 5 --warmup 2 \
    --json "$OUT/bench_distill.json"
step bench_fast 90 python3 scripts/bench_fast.py --device cuda --model preact-resnet-18 \
    --batch-size 128 --steps 10 --repeats 5 --warmup 2 --json "$OUT/bench_fast.json"
step bench_aa 220 python3 scripts/bench_aa.py --device cuda --model wrn-34-10 --n 64 \
    --batch-size 64 --variants plain,channels_last,bf16 --json "$OUT/bench_aa.json"
step bench_data 120 python3 scripts/bench_data.py --images 512 --workers 16 \
    --json "$OUT/bench_data.json"
# ImageNet part 2: Singh et al.'s recipe step (ConvNeXt-T-ConvStem, APGD-2, batch 80 per GPU) in
# bf16 + channels_last + compile, img/s beside the loader's (bench_data: can a 16-core node feed it?)
step bench_imagenet_step 200 python3 scripts/bench_imagenet_step.py --device cuda \
    --batch-size 80 --bf16 --channels-last --compile --repeats 5 --warmup 3 \
    --json "$OUT/bench_imagenet_step.json"

echo "failed steps: ${failed[*]:-none}" | tee "$OUT/summary.txt"
[ ${#failed[@]} = 0 ]
