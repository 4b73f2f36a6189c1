#!/usr/bin/env bash
# The README's pod table (issue 11 item 8): for each of the paper's configs (3B and 12B;
# RAttention-512, SWA-2k, SWA-4k, full attention) at T = 4096 and 8192, the smallest v5p slice on
# which the scanned train step (model.scan_layers) fits with one sequence per chip and fsdp over
# every chip: per-chip peak HBM of that program, and the step's time and tokens/s from libtpu's
# cost model over all layers (`rattn compile`'s scan estimate: a second, cost-only compile with
# two periods per trip of the layer loop).
#   scripts/pod_table.sh [OUT_DIR]                 (default docs/results/pods)
#   ROWS="3b:4096 12b-full:8192" scripts/pod_table.sh   (some rows; default all, T = 4096 first)
#   SLICES="2x2x1 2x2x2"        (tried in order; default GCP's v5p-8 … v5p-128:
#                                2x2x1 2x2x2 2x2x4 2x4x4 4x4x4)
#   RATTN=path/to/rattn         (default target/release/rattn)
#   TABLE_ONLY=1                (print the table from the JSON there is, compile nothing)
# One compile runs at a time. Per attempt <cfg>.T<T>.v5p-<slice>.fsdp<N>.json (the report, also
# when it does not fit) and .time.txt (/usr/bin/time -v, load before and after). An attempt whose
# JSON exists is not compiled again, so a stopped run resumes where it was; a compile that failed
# (not "does not fit") leaves .err.txt and is retried next time. A <name>.base.json (the same
# program compiled earlier without the estimate) is reused through `rattn compile --base-report`,
# so only the estimate's compile runs. The Markdown table goes to stdout and $OUT/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/pods}
rattn=${RATTN:-target/release/rattn}
read -r -a slices <<<"${SLICES:-2x2x1 2x2x2 2x2x4 2x4x4 4x4x4}"
read -r -a rows <<<"${ROWS:-3b:4096 3b-swa2k:4096 3b-swa4k:4096 3b-full:4096 12b:4096 12b-swa2k:4096 \
12b-swa4k:4096 12b-full:4096 3b:8192 3b-swa2k:8192 3b-swa4k:8192 3b-full:8192 12b:8192 \
12b-swa2k:8192 12b-swa4k:8192 12b-full:8192}"
mkdir -p "$out"

chips() { local IFS=x; local n=1 d; for d in $1; do n=$((n * d)); done; echo $n; }

# Whether the report $1 says the train step fits.
fits() { [ "$(jq -r '.programs[0].fits' "$1" 2>/dev/null)" = true ]; }

compile_row() {
  local cfg=$1 t=$2 slice name n
  for slice in "${slices[@]}"; do
    n=$(chips "$slice")
    name=$out/$cfg.T$t.v5p-$slice.fsdp$n
    if [ ! -s "$name.json" ]; then
      local args=(compile --target "tpu:v5p:$slice" --config "configs/$cfg.toml" --set "model.seq_len=$t"
        --batch "$n" --mesh "fsdp=$n" --set model.scan_layers=true --json)
      [ -s "$name.base.json" ] && args+=(--base-report "$name.base.json")
      echo "$(date -u +%T) $rattn ${args[*]}" >&2
      echo "start: $(uptime)" >"$name.time.txt"
      local rc=0
      /usr/bin/time -v -a -o "$name.time.txt" "$rattn" "${args[@]}" >"$name.json.tmp" 2>"$name.err.txt" || rc=$?
      echo "end: $(uptime)" >>"$name.time.txt"
      echo "exit status $rc" >>"$name.time.txt"
      # 0: fits; 1 with a report: does not fit. Anything else is a failure to look at.
      if [ $rc -le 1 ] && jq -e '.programs[0]' "$name.json.tmp" >/dev/null 2>&1; then
        mv "$name.json.tmp" "$name.json"
        rm -f "$name.err.txt"
      else
        rm -f "$name.json.tmp"
        echo "$cfg T=$t on $slice failed (exit $rc): see $name.err.txt" >&2
        return 0
      fi
    fi
    if fits "$name.json"; then
      return 0
    fi
  done
}

if [ -z "${TABLE_ONLY:-}" ]; then
  [ -x "$rattn" ] || { echo "no rattn binary at $rattn (cargo build --release -p trainer)" >&2; exit 1; }
  for row in "${rows[@]}"; do
    compile_row "${row%%:*}" "${row##*:}"
  done
fi
python3 scripts/lib/pod_table.py "$out" "${slices[*]}" "${rows[@]}" | tee "$out/table.md"
