#!/usr/bin/env bash
# The README's length-generalisation table (issue 12 item 4): the tiny all-local stack trained at
# T = 256 (configs/tiny.toml, 800 steps) with RAttention, with plain SWA local layers, and as full
# attention (the same 2-layer stack, every layer global), 2 seeds each; every checkpoint is then
# evaluated without retraining at T, 2T, 4T and 8T (`rattn eval --seq-len 256,512,1024,2048`) on
# 32 held-out recall sequences per length.
#   scripts/length_table.sh [OUT_DIR]   (default OUT_DIR runs/length)
# Finished steps are skipped when the script is restarted: a run whose train.txt exists is not
# trained again, one whose lengths.txt exists is not evaluated again.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/length}
seeds=(0 1)
kinds=(rattention swa full)
lengths=256,512,1024,2048
sequences=32
cargo build --release -p trainer
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
mkdir -p "$out"
# A copy of the binary, so a rebuild while the table runs cannot change it.
cp target/release/rattn "$out/rattn.new" && mv -f "$out/rattn.new" "$out/rattn"
model_args() {
  case $1 in
    rattention) echo 'model.local_kind="rattention"' ;;
    swa) echo 'model.local_kind="swa"' ;;
    full) echo 'model.layer_pattern="0:1"' ;;
  esac
}
for seed in "${seeds[@]}"; do
  for kind in "${kinds[@]}"; do
    dir="$out/$kind-seed$seed"
    set_arg=$(model_args "$kind")
    if [ ! -f "$dir/train.txt" ]; then
      rm -rf "$dir"
      mkdir -p "$dir"
      start=$(date +%s)
      "$out/rattn" train --config configs/tiny.toml --out "$dir" --quiet --seed "$seed" \
        --set "$set_arg" --eval-sequences 0 >"$dir/stdout.txt" 2>"$dir/stderr.txt"
      end=$(date +%s)
      {
        echo "wall_s $((end - start)) load $(cut -d' ' -f1-3 /proc/loadavg) commit $rev"
        cat "$dir/stdout.txt"
      } >"$dir/train.txt"
      echo "trained $kind seed $seed: $((end - start)) s"
    fi
    if [ ! -f "$dir/lengths.txt" ]; then
      start=$(date +%s)
      "$out/rattn" eval --config configs/tiny.toml --checkpoint "$dir" --set "$set_arg" \
        --seq-len "$lengths" --sequences "$sequences" >"$dir/lengths.tmp" 2>"$dir/eval-stderr.txt"
      end=$(date +%s)
      {
        echo "wall_s $((end - start)) load $(cut -d' ' -f1-3 /proc/loadavg) commit $rev"
        cat "$dir/lengths.tmp"
      } >"$dir/lengths.txt"
      rm -f "$dir/lengths.tmp"
      echo "evaluated $kind seed $seed at $lengths: $((end - start)) s"
    fi
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
printf '| run | loss T | loss 2T | loss 4T | loss 8T | > 4LW at T | T..2T at 2T | 2T..4T at 4T | 4T..8T at 8T | <= W at 8T |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for seed in "${seeds[@]}"; do
  for kind in "${kinds[@]}"; do
    printf '| %s seed %s%s |\n' "$kind" "$seed" "$(summary "$out/$kind-seed$seed/lengths.txt")"
  done
done
echo "recall: correct answers in the bucket (answers in it); chance 6.2 %"
