#!/usr/bin/env bash
# The README's real-text table (issue 12 item 6): configs/text-tiny.toml (2 layers, W = 32,
# T = 512, 600 steps of 8 sequences, byte tokens) on Shakespeare (scripts/get_text.sh), trained
# as an all-local RAttention stack, an all-local SWA stack and full attention (every layer
# global), at equal steps; each run ends with the held-out loss (the corpus's last 5 %, never
# trained on), then `rattn eval` scores it again at 2T and 4T without retraining.
#   scripts/text_table.sh [OUT_DIR] [SEEDS...]   (default runs/text, seed 0)
#   STEPS=N scripts/text_table.sh ...            (train N steps instead of the config's 600)
# Finished steps are skipped when the script is restarted (train.txt, lengths.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/text}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0)
kinds=(rattention swa full)
lengths=512,1024,2048
steps_arg=()
[ -z "${STEPS:-}" ] || steps_arg=(--set "train.steps=$STEPS")
scripts/get_text.sh
cargo build --release -p trainer
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
mkdir -p "$out"
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
      "$out/rattn" train --config configs/text-tiny.toml --out "$dir" --quiet --seed "$seed" \
        --set "$set_arg" "${steps_arg[@]}" >"$dir/stdout.txt" 2>"$dir/stderr.txt"
      end=$(date +%s)
      {
        echo "wall_s $((end - start)) load $(cut -d' ' -f1-3 /proc/loadavg) commit $rev"
        cat "$dir/stdout.txt"
      } >"$dir/train.txt"
      echo "trained $kind seed $seed: $((end - start)) s"
    fi
    if [ ! -f "$dir/lengths.txt" ]; then
      "$out/rattn" eval --config configs/text-tiny.toml --checkpoint "$dir" --set "$set_arg" \
        --seq-len "$lengths" --sequences 32 >"$dir/lengths.tmp" 2>"$dir/eval-stderr.txt"
      mv "$dir/lengths.tmp" "$dir/lengths.txt"
      echo "evaluated $kind seed $seed at $lengths"
    fi
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
