"""Bytes each device's train step writes, by op and scope, in two optimized HLO dumps.

Sums the output sizes of the entry computation's instructions (fusions, custom calls,
collectives, copies; parameters, tuples, bitcasts and constants left out) grouped by opcode (the
custom-call target for custom calls) and the first levels of the op_name scope (layer numbers
folded), and prints the groups that differ most between dump A and dump B:
  python3 docs/results/seq-kernel/hlo_bytes.py A/module_0000.train_step.cpu_after_optimizations.txt \
      B/module_0000.train_step.cpu_after_optimizations.txt [levels]
"""
import collections
import re
import sys

BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'pred': 1, 'u8': 1, 'bf16': 2, 'f16': 2}


def nbytes(shape):
    total = 0
    for m in re.finditer(r'(f32|s32|u32|f64|s64|pred|u8|bf16|f16)\[([\d,]*)\]', shape):
        n = 1
        for d in filter(None, m.group(2).split(',')):
            n *= int(d)
        total += n * BYTES[m.group(1)]
    return total


def groups(path, levels):
    text = open(path).read()
    entry = text[text.index('ENTRY'):]
    entry = entry[:entry.index('\n}\n')]
    size, count = collections.Counter(), collections.Counter()
    for line in entry.splitlines()[1:]:
        m = re.match(r'\s*(ROOT )?%(\S+) = (.*?) ([a-z\-]+)\(', line)
        if not m or m.group(4) in ('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant'):
            continue
        op = m.group(4)
        if op == 'custom-call':
            t = re.search(r'custom_call_target="([^"]*)"', line)
            op = 'cc:' + (t.group(1) if t else '?')
        name = re.search(r'op_name="([^"]*)"', line)
        scope = '/'.join((name.group(1) if name else '?').split('/')[:levels])
        scope = re.sub(r'layer_\d+', 'layer_N', re.sub(r'\.\d+', '', scope))
        size[(op, scope)] += nbytes(m.group(3))
        count[(op, scope)] += 1
    return size, count


def main():
    levels = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    (a, ac), (b, bc) = groups(sys.argv[1], levels), groups(sys.argv[2], levels)
    keys = sorted(set(a) | set(b), key=lambda k: -abs(b[k] - a[k]))
    print(f"{'op':30s} {'scope':48s} {'A MB':>8s} {'n':>4s} {'B MB':>8s} {'n':>4s}")
    for k in keys[:40]:
        print(f'{k[0][:30]:30s} {k[1][-48:]:48s} {a[k] / 1e6:8.2f} {ac[k]:4d} {b[k] / 1e6:8.2f} {bc[k]:4d}')
    print(f"{'total MB written per device':79s} {sum(a.values()) / 1e6:8.2f} {sum(ac.values()):4d} "
          f'{sum(b.values()) / 1e6:8.2f} {sum(bc.values()):4d}')


if __name__ == '__main__':
    main()
