#!/usr/bin/env bash
# Fine-tune an MMEA adapter end to end: data -> adapter -> eval -> MD with the new adapter.
#
#   examples/finetune.sh [BASE] [DATA_DIR] [EPOCHS]
#
# BASE      a safe base directory, a trusted mace .model file, or "embedded" (default: the base
#           shipped with the package)
# DATA_DIR  holds train.xyz, valid.xyz and test.xyz with REF_energy / REF_forces (default: the
#           rMD17 aspirin splits in ../shared; the script skips when they are absent)
# EPOCHS    default 60
# Environment: OUT (output folder, default runs/finetune), RANK (16), BATCH (5), MD_STEPS (100),
# PRESET (gates, or paper: also the parts the MMEA authors train), COMPARE=1 also trains LoRA
# (rank 4, alpha 4), a full fine-tune and a preset-paper adapter under the same trainer and
# evaluates them and the bare base on the test set.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
base="${1:-embedded}"
data="${2:-$root/../shared/assets/data/rmd17/aspirin}"
epochs="${3:-60}"
out="${OUT:-$root/runs/finetune}"
rank="${RANK:-16}"
md_steps="${MD_STEPS:-100}"
if [[ ! -f "$data/train.xyz" ]]; then
    echo "skipping: $data/train.xyz is absent (pass DATA_DIR)" >&2
    exit 0
fi
mkdir -p "$out"
common=(--base "$base" --train "$data/train.xyz" --valid "$data/valid.xyz" --epochs "$epochs"
    --batch-size "${BATCH:-5}")

# 1. data -> adapter: a directory with adapter_config.json + adapter_model.safetensors
mmea-calc finetune "${common[@]}" --out "$out/mmea" --method mmea --rank "$rank" \
    --preset "${PRESET:-gates}" --overwrite
mmea-calc info "$out/mmea"

# 2. eval on the held-out test set (metrics as JSON)
mmea-calc eval --base "$base" --adapter "$out/mmea" --data "$data/test.xyz" \
    --json "$out/mmea-test.json"

# 3. MD with the new adapter (selected automatically: its stored environment covers the data)
python "$root/examples/md.py" --base "$base" --adapters "$out/mmea" \
    --structure "$data/test.xyz" --steps "$md_steps" --temperature 300 --traj "$out/md.traj"

# optional: the alternatives, same trainer and schedule (whole models in mace's format)
if [[ "${COMPARE:-0}" == 1 ]]; then
    for method in lora full; do  # LoRA alpha = rank: mace-torch's alpha 1 would scale by 1/4
        alpha=(); [[ $method == lora ]] && alpha=(--lora-alpha 4)
        mmea-calc finetune "${common[@]}" --out "$out/$method" --method "$method" --rank 4 \
            "${alpha[@]}" --overwrite
        mmea-calc eval --base "$out/$method/model.model" --data "$data/test.xyz" \
            --json "$out/$method-test.json"
    done
    mmea-calc finetune "${common[@]}" --out "$out/paper" --rank "$rank" --preset paper --overwrite
    mmea-calc eval --base "$base" --adapter "$out/paper" --data "$data/test.xyz" \
        --json "$out/paper-test.json"
    mmea-calc eval --base "$base" --data "$data/test.xyz" --json "$out/base-test.json"
fi
