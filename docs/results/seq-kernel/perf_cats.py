"""CPU ms per train step by where perf's samples fall, for the runs perf_step.sh recorded.

Steps inside the recorded window = (elapsed - 20 s) / (wall s per step from metrics.jsonl); a
sample is 1/499 s of one thread's CPU. Categories: XLA's generated fusion code (perf's [JIT]
maps), the rest of the PJRT plugin (its runtime and the dot kernels: the plugin is stripped),
our kernels in the rattn binary (matrixmultiply's GEMM apart), libc's copies, the OS kernel.
"""
import json
import re
import subprocess
import sys


def categories(data):
    out = subprocess.run(['perf', 'report', '-i', data, '--sort', 'dso,sym', '--stdio', '-n'],
                         capture_output=True, text=True, check=True).stdout
    total, by = 0, {}
    for line in out.splitlines():
        if line.startswith('#') or not line.strip():
            continue
        m = re.match(r'\s*([\d.]+)%\s+(\d+)\s+(\[JIT\] tid \d+|\S+)\s+\[(.)\]\s+(.*)', line)
        if not m:
            continue
        n, dso, sym = int(m.group(2)), m.group(3), m.group(5)
        total += n
        if dso.startswith('[JIT]'):
            key = 'XLA fusions (JIT code)'
        elif dso.startswith('pjrt'):
            key = 'PJRT plugin (runtime, dots)'
        elif dso == 'rattn':
            key = 'our kernels: GEMM' if 'matrixmultiply' in sym else 'our kernels: other'
        elif dso.startswith('libc'):
            key = 'libc copies' if ('memmove' in sym or 'memcpy' in sym) else 'libc other'
        elif dso.startswith('[kernel'):
            key = 'OS kernel (scheduling, futex)'
        else:
            key = 'other'
        by[key] = by.get(key, 0) + n
    return total, by


def main():
    out, names = sys.argv[1], sys.argv[2:]
    rows = {}
    for n in names:
        elapsed = float(open(f'{out}/{n}.elapsed').read())
        last = [json.loads(l) for l in open(f'{out}/run_{n}/metrics.jsonl')][-1]
        per_step = last['wall_s'] / last['step']
        steps = (elapsed - 20.0) / per_step
        total, by = categories(f'{out}/{n}.data')
        rows[n] = (steps, per_step, total, by)
    keys = sorted({k for r in rows.values() for k in r[3]})
    ms = lambda r, c: c / r[0] * 1000 / 499
    print(f"{'CPU ms per step':32s}" + ''.join(f'{n:>12s}' for n in names))
    for k in keys:
        print(f'{k:32s}' + ''.join(f'{ms(rows[n], rows[n][3].get(k, 0)):12.1f}' for n in names))
    print(f"{'total':32s}" + ''.join(f'{ms(rows[n], rows[n][2]):12.1f}' for n in names))
    print(f"{'wall ms per step (metrics)':32s}" + ''.join(f'{rows[n][1] * 1000:12.1f}' for n in names))


if __name__ == '__main__':
    main()
