# Sums the replayed per-op times of `rattn train --profile DIR` (DIR/trace.json) by category
# (scope / opcode / what the fusion computes). Usage: python3 agg.py DIR/trace.json ...
import json,sys,collections,re
def cat(e):
    a=e['args']; sc=a.get('scope',''); op=a.get('opcode',''); d=a.get('detail','')
    if op.startswith('all-') or op.startswith('collective') or op.startswith('reduce-scatter') or 'all-reduce' in op: c='collective'
    elif 'rla_' in d or 'rla_fwd' in d or 'rla_bwd' in d: c='rla kernel'
    elif 'attn_' in d: c='attn kernel'
    elif '/rope/' in sc: c='rope'
    elif '/mix/' in sc: c='mix'
    elif '/local/' in sc and ('/swa_rla/' in sc or '/swa/' in sc):
        c='local swa/rla hlo: ' + ('dot' if 'dot' in d else 'exp/reduce' if re.search('exp|reduce',d) else 'glue(copy/slice/pad/concat/etc)')
    elif '/local/' in sc: c='local other (norm/mix/rope)'
    elif '/global/' in sc: c='global attn'
    elif '/ffn/' in sc: c='ffn'
    else:
        m=re.search(r'layer_\d+/(\w+)',sc)
        c='layer other' if m else ('top: '+(sc.split('/')[0] if sc else op))
    return c
for f in sys.argv[1:]:
    t=json.load(open(f)); ev=t['traceEvents'] if isinstance(t,dict) else t
    s=collections.Counter(); n=collections.Counter()
    for e in ev:
        if e.get('ph')!='X' or e.get('pid')==1 or 'args' not in e: continue
        c=cat(e); s[c]+=e['dur']; n[c]+=1
    tot=sum(s.values())
    print(f, 'total %.1f ms, %d ops'%(tot/1e3,sum(n.values())))
    for c,v in s.most_common(): print('  %-45s %8.2f ms %5.1f%% %4d ops'%(c,v/1e3,100*v/tot,n[c]))
