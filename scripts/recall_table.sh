#!/usr/bin/env bash
# The README's recall table: the default tiny model (all-local, W = 16, 2 layers) trained with
# RAttention and with plain SWA local layers, 3 seeds each, with the quick start's command.
# Each run ends with its evaluation; the table collects the recall by distance bucket.
#   scripts/recall_table.sh [OUT_DIR] [extra rattn train args...]   (default OUT_DIR runs/recall)
# Finished runs (their eval.txt exists) are skipped when the script is restarted.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/recall}
shift || true
cargo build --release -p trainer
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
mkdir -p "$out"
# A copy of the binary, so a rebuild while the table runs cannot change it.
cp target/release/rattn "$out/rattn"
for seed in 0 1 2; do
  for kind in rattention swa; do
    dir="$out/$kind-seed$seed"
    [ -f "$dir/eval.txt" ] && continue
    rm -rf "$dir"
    mkdir -p "$dir"
    start=$(date +%s)
    "$out/rattn" train --config configs/tiny.toml --out "$dir" --quiet --seed "$seed" \
      --set "model.local_kind=\"$kind\"" "$@" >"$dir/stdout.txt" 2>"$dir/stderr.txt"
    end=$(date +%s)
    {
      echo "wall_s $((end - start)) load $(cut -d' ' -f1-3 /proc/loadavg) commit $rev"
      cat "$dir/stdout.txt"
    } >"$dir/eval.txt"
    echo "$kind seed $seed: $((end - start)) s"
  done
done
# A Markdown table, one row per run: recall % per distance bucket, answer loss, seconds.
echo "built from commit(s) $(head -qn1 "$out"/*/eval.txt | awk '{print $NF}' | sort -u | tr '\n' ' ')\
on $(nproc) cores, $(date -u +%F); load = 1-minute load average at the end of each run"
first="$out/rattention-seed0/eval.txt"
printf '| %-17s' "run"
grep -E '^  .* %$' "$first" | sed -E 's/^  (.{22}).*/\1/; s/ +$//' | while read -r b; do printf ' | %-18s' "$b"; done
printf ' | %s | %s |\n' "answer loss" "wall s (load)"
printf '|%s' "---"
grep -E '^  .* %$' "$first" | while read -r _; do printf '|%s' "---"; done
printf '|---|---|\n'
for seed in 0 1 2; do
  for kind in rattention swa; do
    f="$out/$kind-seed$seed/eval.txt"
    printf '| %-17s' "$kind seed $seed"
    grep -E '^  .* %$' "$f" | awk '{print $(NF-1)}' | while read -r r; do printf ' | %-18s' "$r %"; done
    printf ' | %s | %s (%s) |\n' "$(grep -oE 'eval loss [0-9.]+' "$f" | cut -d' ' -f3)" \
      "$(head -1 "$f" | cut -d' ' -f2)" "$(head -1 "$f" | cut -d' ' -f4)"
  done
done
echo "chance: $(grep -oE 'chance [0-9.]+ %' "$first" | head -1)"
