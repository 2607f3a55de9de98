#!/usr/bin/env bash
# Every GPU check and benchmark of docs/benchmarks.md in one run, most important first, so a run cut
# short still returns what it finished. Results go to $RESULTS (default runs/bench/gpu): the pytest
# log, bench_train JSON (with profiles and operator tables), the plans, the FSDP2-offload run's
# metrics; results.tar.gz packs them after every step.
#
#   bash scripts/gpu_session.sh              # all parts
#   PARTS="tests mfu" bash scripts/gpu_session.sh
#
# Parts: tests (pytest -m gpu), mfu (small + smolvlm-500m at batch 16/64, checkpointing, compile,
# profiles), mfu2 (batch 128 with checkpointing and compile), big (the 7B-class plan and one measured step;
# step7b: the step alone), offload (FSDP2 + CPU offload, one GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS:-runs/bench/gpu}
PARTS=${PARTS:-"mfu big offload tests mfu2"}
PY=${PY:-python3}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# nothing here renders: without libEGL on the machine, MuJoCo must not load a GL backend at import
export MUJOCO_GL=${MUJOCO_GL:-disable}

pack() { tar -czf "$R.tar.gz" -C "$(dirname "$R")" "$(basename "$R")" 2>/dev/null || true; }
step() {  # step NAME CMD...: run, log, report the status, pack
    local name=$1
    shift
    echo "=== $name: $* ($(date +%T))"
    local t0=$SECONDS
    "$@" >"$R/$name.log" 2>&1
    local rc=$?
    grep -v -e "^W[0-9]" -e "Warning" "$R/$name.log" | tail -n 25
    echo "=== $name: exit $rc, $((SECONDS - t0)) s"
    pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/gpu.txt"
$PY -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$R/gpu.txt"

B="$PY scripts/bench_train.py --device cuda --precision bf16"
for part in $PARTS; do
    case $part in
    tests)
        step pytest_gpu $PY -m pytest -q -m gpu tests/train/test_gpu.py -s -p no:cacheprovider
        ;;
    mfu)
        step b16 $B --presets small,smolvlm-500m --batch 16 --out "$R/b16.json"
        step b64 $B --presets smolvlm-500m --batch 64 --no-bare --blocks 3 --profile "$R/prof_b64" --out "$R/b64.json"
        step b64_ckpt $B --presets smolvlm-500m --batch 64 --no-bare --blocks 3 --checkpointing --out "$R/b64_ckpt.json"
        step b64_compile $B --presets smolvlm-500m --batch 64 --no-bare --blocks 3 --compile --warmup 4 \
            --profile "$R/prof_b64_compile" --out "$R/b64_compile.json"
        ;;
    mfu2)
        step b128_ckpt_compile $B --presets smolvlm-500m --batch 128 --no-bare --blocks 3 --checkpointing \
            --compile --warmup 4 --out "$R/b128_ckpt_compile.json"
        ;;
    big | step7b)
        SEVEN_B=(model.pretrained=null model.preset=small model.vision=vit_so400m_patch14_siglip_224
            data.image_size=224 model.language=docs/examples/llama2-7b train.batch_size=8)
        [ "$part" = big ] && step plan_7b $PY scripts/plan_memory.py --cfg pick_place.yaml "${SEVEN_B[@]}" \
            model.gradient_checkpointing=true train.optimizer=adamw8bit --gpu-gb 80 --json "$R/plan_7b.json"
        step step_7b $B --presets small --vision vit_so400m_patch14_siglip_224 --image-size 224 \
            --language docs/examples/llama2-7b --batch 8 --checkpointing --optimizer adamw8bit --no-bare \
            --warmup 1 --blocks 1 --steps 2 --out "$R/step_7b.json"
        [ "$part" = big ] && step plan_7b_offload $PY scripts/plan_memory.py --cfg pick_place.yaml "${SEVEN_B[@]}" \
            model.gradient_checkpointing=true train.parallel=fsdp train.cpu_offload=true --json "$R/plan_7b_offload.json"
        ;;
    offload)
        # one process of FSDP2 with weights, gradients and AdamW state on the CPU: smolvlm-500m on a
        # small synthetic file (tests/train/conftest.py's writer), 20 steps, step time and GPU peak
        $PY -c "import sys; sys.path.insert(0, 'tests/train'); from pathlib import Path; from conftest import write_reach_file; write_reach_file(Path('$R/reach.hdf5'), demos=16, steps=16)"
        step offload_500m $PY -m torch.distributed.run --standalone --nproc_per_node 1 scripts/finetune.py \
            --cfg base.yaml "data.paths=[$R/reach.hdf5]" data.collect_if_missing=false model.pretrained=null \
            model.preset=smolvlm-500m train.parallel=fsdp train.cpu_offload=true train.precision=bf16 \
            train.batch_size=16 train.steps=20 train.warmup_steps=2 train.val_every=1000 train.save_every=1000 \
            "train.out_dir=$R/runs" train.run_name=offload eval.episodes=0 log.wandb=disabled log.progress=false \
            log.every=5 log.plots=false
        grep '"split": "train"' "$R/runs/offload/metrics.jsonl" | tail -n 2
        rm -rf "$R/runs/offload/best" "$R/runs/offload/last" "$R/runs/offload/checkpoints"
        step plan_500m_offload $PY scripts/plan_memory.py --cfg pick_place.yaml model.pretrained=null \
            model.preset=smolvlm-500m train.batch_size=16 train.parallel=fsdp train.cpu_offload=true \
            train.precision=bf16 --json "$R/plan_500m_offload.json"
        rm -f "$R/reach.hdf5"
        pack
        ;;
    *) echo "unknown part: $part (tests, mfu, mfu2, big, step7b, offload)" ;;
    esac
done
echo "=== done ($(date +%T))"
