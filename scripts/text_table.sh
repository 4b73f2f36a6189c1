#!/usr/bin/env bash
# The README's real-text table (issue 12 item 6): configs/text-tiny.toml (2 layers, W = 32,
# T = 512, 600 steps of 8 sequences, byte tokens) on Shakespeare (scripts/get_text.sh), trained
# as an all-local RAttention stack, an all-local SWA stack and full attention (every layer
# global) with RoPE on its layers (full-rope, the paper's baseline) and without positional
# encoding (full-nope), at equal steps; each run ends with the held-out loss (the corpus's last
# 5 %, never trained on), then `rattn eval` scores it again at 2T and 4T without retraining.
#   scripts/text_table.sh [OUT_DIR] [SEEDS...]   (default runs/text, seed 0)
#   STEPS=N scripts/text_table.sh ...            (train N steps instead of the config's 600)
#   KINDS="swa full-rope" scripts/text_table.sh ...   (a part of the kinds)
# Finished steps are skipped when the script is restarted (train.txt, lengths.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/table_runs.sh
out=${1:-runs/text}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0)
read -r -a kinds <<<"${KINDS:-rattention swa full-rope full-nope}"
lengths=512,1024,2048
steps_arg=()
[ -z "${STEPS:-}" ] || steps_arg=(--set "train.steps=$STEPS")
scripts/get_text.sh
table_setup "$out"
for seed in "${seeds[@]}"; do
  for kind in "${kinds[@]}"; do
    table_run "$out" "$kind" "$seed" configs/text-tiny.toml "$lengths" 32 "${steps_arg[@]}"
  done
done
echo "built from commit(s) $(head -qn1 "$out"/*/train.txt | awk '{print $NF}' | sort -u | tr '\n' ' ')\
on $(nproc) cores, $(date -u +%F)"
printf '| run | train loss (last step) | held-out loss at T = 512 (bits/byte) | at 2T | at 4T | wall s (load) |\n'
printf '|---|---|---|---|---|---|\n'
for seed in "${seeds[@]}"; do
  for kind in "${kinds[@]}"; do
    dir="$out/$kind-seed$seed"
    t=$(grep -oE 'eval loss [0-9.]+' "$dir/train.txt" | cut -d' ' -f3)
    more=$(grep -oE '^eval loss [0-9.]+' "$dir/lengths.txt" | cut -d' ' -f3 | tail -n +2 | tr '\n' ' ')
    read -r l2 l4 <<<"$more"
    printf '| %s seed %s | %s | %s (%s) | %s | %s | %s (%s) |\n' "$kind" "$seed" \
      "$(grep -oE 'final loss [0-9.]+' "$dir/train.txt" | cut -d' ' -f3)" "$t" \
      "$(awk -v l="$t" 'BEGIN { printf "%.3f", l / log(2) }')" "$l2" "$l4" \
      "$(head -1 "$dir/train.txt" | cut -d' ' -f2)" "$(head -1 "$dir/train.txt" | cut -d' ' -f4)"
  done
done
