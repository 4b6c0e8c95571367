#!/usr/bin/env bash
# Reproduces the tables in benchmarks/RESULTS.md on one GPU (needs diffusers installed for --compare):
#   bash benchmarks/run_all.sh [OUTDIR] [dit|shapes|padding|stages|fp8|attention|profile|
#                                        edit|lightning|lora|cache|qwen21|memory|quant|multigpu|all]
# (multigpu needs 2 GPUs, runs its 4-GPU rows where there are 4, and is not part of all; cache needs cache-dit
# for its diffusers rows)
# Set FASTDIT="python -m fastdit" if the `fastdit` command is not on PATH.
set -euo pipefail
out=${1:-bench-results}
what=${2:-all}
fd=${FASTDIT:-fastdit}
mkdir -p "$out"
run() { echo "+ $fd $*" >&2; $fd "$@"; }

if [[ $what == dit || $what == all ]]; then
    run bench --compile --compare diffusers --cuda-graph --json "$out/dit-1024.json"
fi
if [[ $what == shapes || $what == all ]]; then
    run bench --compile --compare diffusers-eager --height 512 --width 512 --json "$out/dit-512.json"
    run bench --compile --compare diffusers-eager --height 1328 --width 1328 --json "$out/dit-1328.json"
    run bench --compile --compare diffusers-eager --no-cfg --json "$out/dit-1024-batch1.json"
fi
if [[ $what == padding || $what == all ]]; then
    # CFG with a short negative prompt: uncond text padded from 8 to 128 tokens.
    run bench --compile --uncond-text-len 8 --padding lengths --json "$out/dit-1024-pad-lengths.json"
    run bench --compile --uncond-text-len 8 --padding mask --json "$out/dit-1024-pad-mask.json"
fi
if [[ $what == stages || $what == all ]]; then
    run bench --stage vae --json "$out/vae-1024.json"
    run bench --stage text-encoder --json "$out/text-encoder.json"
fi
here=$(dirname "$0")
if [[ $what == fp8 || $what == all ]]; then
    echo "+ python $here/fp8_check.py" >&2
    python "$here/fp8_check.py" | tee "$out/fp8.txt"
fi
if [[ $what == attention || $what == all ]]; then
    echo "+ python $here/attention_backends.py" >&2
    python "$here/attention_backends.py" | tee "$out/attention.txt"
    echo "+ python $here/cudnn_plans.py" >&2
    python "$here/cudnn_plans.py" | tee "$out/cudnn-plans.txt"
fi
if [[ $what == profile || $what == all ]]; then
    for variant in "" "--quantize fp8" "--quantize fp8 --attention fp8"; do
        echo "+ python $here/profile_step.py $variant" >&2
        # shellcheck disable=SC2086
        python "$here/profile_step.py" $variant | tee -a "$out/profile.txt"
    done
fi
if [[ $what == edit || $what == all ]]; then
    # Edit-2511 DiT step (zero_cond_t) with one and two references at 1024^2, against diffusers' model.
    run bench --task edit --refs 1 --compile --compare diffusers --cuda-graph --json "$out/edit-r1.json"
    run bench --task edit --refs 2 --compile --compare diffusers --cuda-graph --json "$out/edit-r2.json"
    run bench --task edit --refs 1 --compile --cuda-graph --quantize fp8 --json "$out/edit-r1-fp8.json"
fi
if [[ $what == lightning || $what == all ]]; then
    # Whole 1024^2 images (text encoder + DiT steps without CFG + VAE decode) with the Lightning schedule.
    for steps in 8 4; do
        run bench --stage pipeline --scheduler lightning --steps $steps --quantize fp8 --compile --cuda-graph \
            --warmup 1 --iters 4 --json "$out/lightning-$steps-fp8.json"
        run bench --stage pipeline --scheduler lightning --steps $steps --compile --cuda-graph \
            --warmup 1 --iters 4 --json "$out/lightning-$steps-bf16.json"
    done
fi
if [[ $what == lora || $what == all ]]; then
    run bench --compile --cuda-graph --lora-rank 16,64,128 --loras 1 --json "$out/lora-k1.json"
    run bench --compile --cuda-graph --lora-rank 64 --loras 3 --json "$out/lora-k3.json"
fi
if [[ $what == cache || $what == all ]]; then
    # A fixed 23-of-50 schedule; --compare diffusers adds diffusers + cache-dit with the same static mask.
    sched=(--cache-schedule "compute 4, then every 2nd" --steps 50 --cache F8B0 --warmup 0 --iters 1)
    run bench "${sched[@]}" --compile --cuda-graph --compare diffusers --json "$out/cache-bf16.json"
    run bench "${sched[@]}" --compile --cuda-graph --quantize fp8 --json "$out/cache-fp8.json"
fi
if [[ $what == qwen21 || $what == all ]]; then
    q21=(bench --family qwen-image-2.1 --no-cfg --compile --cuda-graph)
    run "${q21[@]}" --compare diffusers-eager --json "$out/q21-t2i.json"
    run "${q21[@]}" --compare diffusers-eager --condition-images 1 --json "$out/q21-edit.json"
    run "${q21[@]}" --quantize fp8 --json "$out/q21-t2i-fp8.json"
fi
if [[ $what == memory || $what == all ]]; then
    # Whole images under memory plans with the GPU capped at 24 and 16 GiB, and diffusers' offloading modes.
    run bench --stage memory --recipes fp8,int4 --memory-cap-gb 0 24 16 --steps 10 --json "$out/memory.json"
fi
if [[ $what == quant || $what == all ]]; then
    run bench --stage quant --recipes bf16,fp8,fp8-fast,fp8-blockwise,int4 --json "$out/quant.json"
fi
if [[ $what == multigpu ]]; then
    gpus=$(python -c "import torch; print(torch.cuda.device_count())")
    b=(bench --iters 8 --warmup 2 --compile --profile --cuda-graph)
    f8=(--quantize fp8 --attention fp8)
    big=(--height 1328 --width 1328)
    run "${b[@]}" --compare diffusers-eager --json "$out/multi-1gpu.json"
    run "${b[@]}" "${f8[@]}" --json "$out/multi-1gpu-fp8.json"
    run "${b[@]}" "${big[@]}" --json "$out/multi-1gpu-1328.json"
    run "${b[@]}" "${f8[@]}" "${big[@]}" --json "$out/multi-1gpu-fp8-1328.json"
    # 2 GPUs
    run "${b[@]}" --cfg-parallel --json "$out/multi-cfg2.json"
    run "${b[@]}" --sp 2 --json "$out/multi-sp2.json"
    run "${b[@]}" --tp 2 --json "$out/multi-tp2.json"
    run "${b[@]}" --cfg-parallel "${f8[@]}" --json "$out/multi-cfg2-fp8.json"
    run "${b[@]}" --sp 2 "${f8[@]}" --json "$out/multi-sp2-fp8.json"
    run "${b[@]}" --cfg-parallel "${big[@]}" --json "$out/multi-cfg2-1328.json"
    if ((gpus >= 4)); then
        for layout in "--sp 4" "--tp 4" "--tp 2 --sp 2" "--cfg-parallel --sp 2" "--cfg-parallel --tp 2"; do
            name=$(echo "$layout" | tr -d ' -')
            # shellcheck disable=SC2086
            run "${b[@]}" $layout --json "$out/multi-$name.json"
            # shellcheck disable=SC2086
            run "${b[@]}" $layout "${f8[@]}" --json "$out/multi-$name-fp8.json"
            # shellcheck disable=SC2086
            run "${b[@]}" $layout "${big[@]}" --json "$out/multi-$name-1328.json"
        done
    fi
    echo "+ python -m pytest -m gpu tests/test_parallel_gpu.py" >&2
    python -m pytest -q -s -m gpu "$here/../tests/test_parallel_gpu.py" | tee "$out/multi-numerics.txt"
fi
