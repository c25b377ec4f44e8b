#!/usr/bin/env bash
# DataFlex CPU quick start: build a tiny model, train a LoRA adapter on data picked by a
# selector, then merge the adapter into the model. Offline; about a minute on a laptop CPU.
#
#   bash examples/quickstart.sh
#
# Everything it writes goes to saves/ (git-ignored).
set -euo pipefail

# Run from the repository root whatever the caller's working directory is.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Nothing here needs the network: the model is built locally, the data are in data/.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export DISABLE_VERSION_CHECK=1
export HF_HOME="${HF_HOME:-saves/hf-home}"

MODEL_DIR=saves/tiny-qwen2
TRAIN_CFG=examples/train_lora/quickstart_cpu.yaml
MERGE_CFG=examples/merge_lora/quickstart_cpu.yaml
ADAPTER_DIR="$MODEL_DIR/lora/quickstart"
MERGED_DIR="$MODEL_DIR/merged"

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    echo "==> Building the tiny demo model in $MODEL_DIR"
    python -m dataflex.demo model "$MODEL_DIR"
fi

echo "==> Training with dynamic data selection: dataflex-cli train $TRAIN_CFG"
dataflex-cli train "$TRAIN_CFG"

echo "==> Merging the adapter: llamafactory-cli export $MERGE_CFG"
llamafactory-cli export "$MERGE_CFG"

shopt -s nullglob
records=("$ADAPTER_DIR"/dataflex/*/step_*.json)
shopt -u nullglob

echo
echo "Done."
echo "  LoRA adapter:      $ADAPTER_DIR"
echo "  Selection records: $ADAPTER_DIR/dataflex/<run id>/step_*.json (${#records[@]} file(s))"
for record in "${records[@]}"; do
    echo "                     $record"
done
echo "  Merged model:      $MERGED_DIR"
echo
echo "See what the selector picked, as text or as one HTML page to open in a browser:"
echo "  dataflex-cli report $ADAPTER_DIR"
echo "  dataflex-cli report $ADAPTER_DIR --html $ADAPTER_DIR/dataflex_report.html --group-by task"
