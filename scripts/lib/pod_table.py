"""The pod table of scripts/pod_table.sh, from the `rattn compile --json` reports in OUT.

usage: pod_table.py OUT "SLICE SLICE ..." CFG:T [CFG:T ...]

Per row, the first slice (in the order given) whose report says the train step fits; the
estimate columns are `rattn compile`'s scan_estimate (the formula lives there, in
crates/trainer/src/compile/scan_estimate.rs); nothing is recomputed here. The environment
says which files: POD_MESH (pod_table.sh's MESH, e.g. "fsdp=2,tensor=2"; empty: fsdp over every
chip) and POD_TAG (its TAG, appended to the names).
"""

import json
import os
import re
import sys

GIB = 1024**3
NAMES = {
    "3b": "3B RAttention-512",
    "3b-swa2k": "3B SWA-2k",
    "3b-swa4k": "3B SWA-4k",
    "3b-full": "3B full",
    "12b": "12B RAttention-512",
    "12b-swa2k": "12B SWA-2k",
    "12b-swa4k": "12B SWA-4k",
    "12b-full": "12B full",
}


def chips(slice_):
    n = 1
    for d in slice_.split("x"):
        n *= int(d)
    return n


def loads(path):
    """The 1-minute load averages at the start and the end of a compile, from its .time.txt."""
    if not os.path.exists(path):
        return []
    found = re.findall(r"load average: ([0-9.]+)", open(path).read())
    return [float(x) for x in found]


def cpu_seconds(path):
    if not os.path.exists(path):
        return None
    t = open(path).read()
    u = re.search(r"User time \(seconds\): ([0-9.]+)", t)
    s = re.search(r"System time \(seconds\): ([0-9.]+)", t)
    return float(u.group(1)) + float(s.group(1)) if u and s else None


def mesh_name(chips_):
    """The file-name part of the mesh, as pod_table.sh's mesh_name writes it."""
    m = os.environ.get("POD_MESH", "")
    if not m:
        return f"fsdp{chips_}"
    return m.replace("=", "").replace("-1", "rest").replace(",", "-")


def mesh_text(r):
    """The mesh's axes larger than 1 from a report's "mesh" ("4 devices = data 1 × fsdp 2 × ...")."""
    axes = r["mesh"].split("=", 1)[1].split("×")
    big = [a.strip() for a in axes if not a.strip().endswith(" 1")]
    text = " × ".join(big) or "1 device"
    # Rules other than the defaults ("embed → [fsdp, seq] (default [fsdp])"), and the global
    # layers' scheme under seq ("global layers: zigzag (mesh.seq_global = auto; ...)").
    extra = [re.sub(r" \(default .*\)$", "", x) for x in r.get("mesh_rules") or []]
    g = r.get("seq_global")
    if g:
        extra.append("global " + g.split(":", 1)[1].split("(", 1)[0].strip())
    return text + (f" ({'; '.join(extra)})" if extra else "")


def row(out, slices, cfg, t):
    name = NAMES.get(cfg, cfg)
    tried = []
    for s in slices:
        tag = os.environ.get("POD_TAG", "")
        base = os.path.join(out, f"{cfg}.T{t}.v5p-{s}.{mesh_name(chips(s))}" + (f".{tag}" if tag else ""))
        if not os.path.exists(base + ".json"):
            why = f"not on {', '.join(tried)}; " if tried else ""
            mem = ""
            if os.path.exists(base + ".base.json"):
                b = json.load(open(base + ".base.json"))["programs"][0]
                if b["fits"]:
                    mem = f"{b['memory']['peak_bytes'] / GIB:.2f} GiB (u=1 compile only)"
            return (
                f"| {name} | {t} | not measured ({why}next: v5p {s}) | | {mem} | | | | | "
                f"`ROWS={cfg}:{t} scripts/pod_table.sh` (with the MESH/SETS/TAG of this table) |"
            )
        r = json.load(open(base + ".json"))
        p = r["programs"][0]
        if not p["fits"]:
            # libtpu's refusal names what the temporaries need ("... HLO temporaries (128.85G)").
            need = re.search(r"HLO temporaries \(([^)]+)\)", p.get("verdict") or "")
            tried.append(f"v5p {s} ({chips(s)} chips" + (f"; temporaries {need.group(1)}" if need else "") + ")")
            continue
        m = p["memory"]
        free = r["device_memory_bytes"] - m["peak_bytes"]
        est = p.get("scan_estimate") or {}
        cost = est.get("cost") or {}
        opt = cost.get("optimal_seconds")
        tps = est.get("tokens_per_second")
        tpc = est.get("tokens_per_second_per_chip")
        flops = cost.get("flops")
        compile_s = p["compile_seconds"] + est.get("second_compile_seconds", 0.0)
        ld = loads(base + ".base.time.txt") + loads(base + ".time.txt")
        load = f"{min(ld):.0f}–{max(ld):.0f}" if ld else "?"
        cpu = [c for c in (cpu_seconds(base + ".base.time.txt"), cpu_seconds(base + ".time.txt")) if c]
        cpu_s = f"{sum(cpu):.0f} CPU s, " if cpu else ""
        fmt = lambda v, f: "–" if v is None else format(v, f)
        opt_s = fmt(opt, ".3f")
        second = est.get("second_verdict") or ""
        if opt is None and second.startswith("does not fit"):
            # The estimate's compile (2 periods per trip) holds more than the step itself.
            opt_s = "– (the estimate's u=2 compile does not fit)"
        return (
            f"| {name} | {t} | v5p {s} ({chips(s)} chips)"
            + (f"; not on {', '.join(tried)}" if tried else "")
            + f" | {mesh_text(r)}, batch {r['batch']} "
            f"| {m['peak_bytes'] / GIB:.2f} GiB ({free / GIB:.1f} free) "
            f"| {opt_s} | {fmt(tpc, ',.0f')} | {fmt(tps, ',.0f')} | {fmt(flops, '.3e')} "
            f"| {cpu_s}{compile_s:.0f} s wall at load {load} |"
        )
    return (
        f"| {name} | {t} | does not fit on any slice tried ({', '.join(tried)}) | | | | | | |"
    )


def main():
    out, slices, rows = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
    print(
        "| config | T | smallest v5p slice | mesh, batch | peak HBM / chip | est. s / step "
        "| tokens/s / chip | tokens/s / slice | FLOPs / chip / step | compiles (u=1 + estimate), or the command to measure |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cfg, t = r.split(":")
        print(row(out, slices, cfg, t))


main()
