#!/usr/bin/env bash
# Fine-tune an MMEA adapter on rMD17 aspirin, compare it with LoRA and full fine-tuning, and
# evaluate all of them on the test set. Needs the shared assets (../shared relative to the repo);
# pass other paths as arguments: examples/finetune.sh BASE.model DATA_DIR [EPOCHS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
base="${1:-$root/../shared/assets/models/mace-spice-small.model}"
data="${2:-$root/../shared/assets/data/rmd17/aspirin}"
epochs="${3:-60}"
out="${OUT:-$root/runs/aspirin}"
if [[ ! -f "$base" || ! -f "$data/train.xyz" ]]; then
    echo "skipping: $base or $data/train.xyz is absent" >&2
    exit 0
fi
mkdir -p "$out"
common=(--base "$base" --train "$data/train.xyz" --valid "$data/valid.xyz" --epochs "$epochs")

# the product: an adapter directory (adapter_config.json + adapter_model.safetensors)
mmea-calc finetune "${common[@]}" --out "$out/mmea" --method mmea --rank 16 --overwrite
mmea-calc info "$out/mmea"
mmea-calc eval --base "$base" --adapter "$out/mmea" --data "$data/test.xyz" \
    --json "$out/mmea-test.json" --plot "$out/mmea-test.png"

# the alternatives, same trainer and schedule: whole models in mace's format
for method in lora full; do
    mmea-calc finetune "${common[@]}" --out "$out/$method" --method "$method" --rank 4 --overwrite
    mmea-calc eval --base "$out/$method/model.model" --data "$data/test.xyz" \
        --json "$out/$method-test.json"
done

# the base model without fine-tuning, for reference
mmea-calc eval --base "$base" --data "$data/test.xyz" --json "$out/base-test.json"
