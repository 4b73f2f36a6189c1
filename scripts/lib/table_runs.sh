#!/usr/bin/env bash
# The run loop shared by scripts/length_table.sh and scripts/text_table.sh (sourced, not run):
# one training run per (kind, seed), then `rattn eval --seq-len` of its checkpoint without
# retraining. Finished steps are skipped when a script is restarted: a run whose train.txt exists
# is not trained again, one whose lengths.txt exists is not evaluated again.
#
#   table_setup OUT                 build the trainer, copy the binary to OUT/rattn, set $rev
#   kind_args KIND                  the --set arguments of a kind, one per line
#   table_run OUT KIND SEED CONFIG LENGTHS SEQUENCES [TRAIN_ARGS...]
#
# Kinds: rattention (all-local RAttention stack), swa (all-local SWA stack), full-rope (every
# layer global, RoPE on global layers: the paper's full-attention baseline), full-nope (every
# layer global without positional encoding: our global layers as the RAttention stacks use them).

table_setup() {
  cargo build --release -p trainer
  rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
  mkdir -p "$1"
  # A copy of the binary, so a rebuild while the table runs cannot change it.
  cp target/release/rattn "$1/rattn.new" && mv -f "$1/rattn.new" "$1/rattn"
}

kind_args() {
  case $1 in
    rattention) echo 'model.local_kind="rattention"' ;;
    swa) echo 'model.local_kind="swa"' ;;
    full-rope) printf '%s\n' 'model.layer_pattern="0:1"' 'model.global_rope=true' ;;
    full-nope) echo 'model.layer_pattern="0:1"' ;;
    *) echo "unknown kind $1 (rattention, swa, full-rope, full-nope)" >&2; return 1 ;;
  esac
}

# The wall time, the 1-minute load and the commit, then the command's stdout, into FILE.
stamped() {
  local file=$1 start end
  shift
  start=$(date +%s)
  "$@" >"$file.stdout" 2>"$file.stderr"
  end=$(date +%s)
  {
    echo "wall_s $((end - start)) load $(cut -d' ' -f1-3 /proc/loadavg) commit $rev"
    cat "$file.stdout"
  } >"$file.tmp"
  mv "$file.tmp" "$file"
  rm -f "$file.stdout"
  echo "$file: $((end - start)) s"
}

table_run() {
  local out=$1 kind=$2 seed=$3 config=$4 lengths=$5 sequences=$6
  shift 6
  local dir="$out/$kind-seed$seed" sets=() a
  while read -r a; do sets+=(--set "$a"); done < <(kind_args "$kind")
  if [ ! -f "$dir/train.txt" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    stamped "$dir/train.txt" "$out/rattn" train --config "$config" --out "$dir" --quiet \
      --seed "$seed" "${sets[@]}" "$@"
  fi
  if [ ! -f "$dir/lengths.txt" ]; then
    stamped "$dir/lengths.txt" "$out/rattn" eval --config "$config" --checkpoint "$dir" \
      "${sets[@]}" --seq-len "$lengths" --sequences "$sequences"
  fi
}
