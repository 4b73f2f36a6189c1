#!/usr/bin/env bash
# The README's length-generalisation table (issue 12 item 4): the tiny all-local stack trained at
# T = 256 (configs/tiny.toml, 800 steps) with RAttention, with plain SWA local layers, and as full
# attention (the same 2-layer stack, every layer global) with RoPE on its layers (full-rope, the
# paper's baseline) and without positional encoding (full-nope); every checkpoint is then
# evaluated without retraining at T, 2T, 4T and 8T (`rattn eval --seq-len 256,512,1024,2048`) on
# 32 held-out recall sequences per length.
#   scripts/length_table.sh [OUT_DIR] [SEEDS...]   (default runs/length, seeds 0 1)
#   KINDS="full-rope full-nope" scripts/length_table.sh ...   (a part of the kinds)
# Finished steps are skipped when the script is restarted (train.txt, lengths.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/table_runs.sh
out=${1:-runs/length}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1)
read -r -a kinds <<<"${KINDS:-rattention swa full-rope full-nope}"
lengths=256,512,1024,2048
sequences=32
table_setup "$out"
for seed in "${seeds[@]}"; do
  for kind in "${kinds[@]}"; do
    table_run "$out" "$kind" "$seed" configs/tiny.toml "$lengths" "$sequences" --eval-sequences 0
  done
done
# A Markdown table, one row per run: the answer loss at each length, then the recall of the
# bucket of the farthest distances each length holds (> 4LW at T; T..2T at 2T; 2T..4T at 4T;
# 4T..8T at 8T), then recall within the window at 8T.
echo "built from commit(s) $(head -qn1 "$out"/*/lengths.txt | awk '{print $NF}' | sort -u | tr '\n' ' ')\
on $(nproc) cores, $(date -u +%F); $sequences held-out sequences per length"
summary() {
  awk '
    /^at seq_len/ { n++; len[n] = $3 }
    /^eval loss/ { loss[n] = $3 }
    /^  .* %$/ { far[n] = $(NF-1); fartot[n] = $(NF-2); if (near[n] == "") near[n] = $(NF-1) }
    END {
      row = ""
      for (i = 1; i <= n; i++) row = row sprintf(" | %s", loss[i])
      for (i = 1; i <= n; i++) { split(fartot[i], a, "/"); row = row sprintf(" | %s %% (%s)", far[i], a[2]) }
      row = row sprintf(" | %s %%", near[n])
      print row
    }' "$1"
}
printf '| run | loss T | loss 2T | loss 4T | loss 8T | > 4LW at T | T..2T at 2T | 2T..4T at 4T | 4T..8T at 8T | <= W at 8T | wall s train (load) |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|\n'
for seed in "${seeds[@]}"; do
  for kind in "${kinds[@]}"; do
    dir="$out/$kind-seed$seed"
    printf '| %s seed %s%s | %s (%s) |\n' "$kind" "$seed" "$(summary "$dir/lengths.txt")" \
      "$(head -1 "$dir/train.txt" | cut -d' ' -f2)" "$(head -1 "$dir/train.txt" | cut -d' ' -f4)"
  done
done
echo "recall: correct answers in the bucket (answers in it); chance 6.2 %"
