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
#   MESH="fsdp=2,tensor=2"      (another mesh than fsdp over every chip; its product must be the
#                                slice's chip count, or one axis -1 for the rest)
#   BATCH=4                     (sequences per step; default one per chip)
#   SETS='mesh.rules.embed=["fsdp","seq"] mesh.seq_global=dense'   (more --set overrides, split
#                                at spaces; needs TAG)
#   TAG=embedseq                (appended to the file names of these rows; needed with SETS)
# One compile runs at a time. Per attempt <name> = <cfg>.T<T>.v5p-<slice>.<mesh>[.<TAG>] (<mesh>:
# fsdp<N> by default, else MESH with "fsdp=2,tensor=2" written fsdp2-tensor2): first the
# step's own compile, `--no-scan-estimate`, into <name>.base.json (memory and verdict; also when it
# does not fit), then where it fits the estimate's compile, which reuses it through
# `--base-report`, into <name>.json; each with a .time.txt (/usr/bin/time -v, load before and
# after). A compile whose JSON exists is not run again, so a stopped run resumes where it was; one
# that failed (not "does not fit") leaves .err.txt and is retried next time. The Markdown table
# goes to stdout and $OUT/table.md (with MESH or TAG: $OUT/table.<mesh>[.<TAG>].md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/pods}
rattn=${RATTN:-target/release/rattn}
read -r -a slices <<<"${SLICES:-2x2x1 2x2x2 2x2x4 2x4x4 4x4x4}"
read -r -a rows <<<"${ROWS:-3b:4096 3b-swa2k:4096 3b-swa4k:4096 3b-full:4096 12b:4096 12b-swa2k:4096 \
12b-swa4k:4096 12b-full:4096 3b:8192 3b-swa2k:8192 3b-swa4k:8192 3b-full:8192 12b:8192 \
12b-swa2k:8192 12b-swa4k:8192 12b-full:8192}"
read -r -a sets <<<"${SETS:-}"
tag=${TAG:-}
if [ ${#sets[@]} -gt 0 ] && [ -z "$tag" ]; then
  echo "SETS needs a TAG (the file names must differ from the rows without those overrides)" >&2
  exit 1
fi
mkdir -p "$out"

# The file-name part of the mesh on a slice of $1 chips: fsdp<N>, or MESH as fsdp2-tensor2.
mesh_name() {
  if [ -z "${MESH:-}" ]; then echo "fsdp$1"; else local m=${MESH//=/}; m=${m//-1/rest}; echo "${m//,/-}"; fi
}

chips() { local IFS=x; local n=1 d; for d in $1; do n=$((n * d)); done; echo $n; }

# Whether the report $1 says the train step fits.
fits() { [ "$(jq -r '.programs[0].fits' "$1" 2>/dev/null)" = true ]; }

# Runs `rattn compile` with the arguments after $1 into $1.json and $1.time.txt; 0 when a report
# came back (the step fits or does not), 1 on a failure (kept in $1.err.txt).
run_compile() {
  local name=$1 rc=0
  shift
  echo "$(date -u +%T) $rattn $*" >&2
  echo "start: $(uptime)" >"$name.time.txt"
  /usr/bin/time -v -a -o "$name.time.txt" "$rattn" "$@" >"$name.json.tmp" 2>"$name.err.txt" || rc=$?
  echo "end: $(uptime)" >>"$name.time.txt"
  echo "exit status $rc" >>"$name.time.txt"
  # 0: fits; 1 with a report: does not fit. Anything else is a failure to look at.
  if [ $rc -le 1 ] && jq -e '.programs[0]' "$name.json.tmp" >/dev/null 2>&1; then
    mv "$name.json.tmp" "$name.json"
    rm -f "$name.err.txt"
    return 0
  fi
  rm -f "$name.json.tmp"
  echo "failed (exit $rc): see $name.err.txt" >&2
  return 1
}

# The smallest slice where row $1 at T = $2 fits: per slice, the u = 1 compile (memory, verdict)
# into .base.json, then, where it fits, the estimate's compile reusing it (--base-report).
compile_row() {
  local cfg=$1 t=$2 slice name n
  for slice in "${slices[@]}"; do
    n=$(chips "$slice")
    name=$out/$cfg.T$t.v5p-$slice.$(mesh_name "$n")${tag:+.$tag}
    local args=(compile --target "tpu:v5p:$slice" --config "configs/$cfg.toml" --set "model.seq_len=$t"
      --batch "${BATCH:-$n}" --mesh "${MESH:-fsdp=$n}" --set model.scan_layers=true --json)
    local kv
    for kv in "${sets[@]}"; do args+=(--set "$kv"); done
    if [ ! -s "$name.json" ] && [ ! -s "$name.base.json" ]; then
      run_compile "$name.base" "${args[@]}" --no-scan-estimate || return 0
    fi
    if [ ! -s "$name.json" ]; then
      if fits "$name.base.json"; then
        run_compile "$name" "${args[@]}" --base-report "$name.base.json" || return 0
      else
        cp "$name.base.json" "$name.json"
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
table=$out/table.md
if [ -n "${MESH:-}" ] || [ -n "$tag" ]; then
  table=$out/table.$(mesh_name "")${tag:+.$tag}.md
fi
POD_MESH=${MESH:-} POD_TAG=$tag python3 scripts/lib/pod_table.py "$out" "${slices[*]}" "${rows[@]}" |
  tee "$table"
