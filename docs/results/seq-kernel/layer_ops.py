# Lists the replayed ops of layer 0's local attention region (scopes .../local/swa_rla/ and .../local/swa/,
# without RoPE and the mix) of `rattn train --profile DIR`, backward then forward, slowest first, µs per device.
# Usage: python3 layer_ops.py DIR/trace.json
import json,collections,re,sys
t=json.load(open(sys.argv[1])); ev=t['traceEvents'] if isinstance(t,dict) else t
rows=[]
for e in ev:
    if e.get('ph')!='X' or 'args' not in e: continue
    a=e['args']; sc=a.get('scope','')
    if 'layer_0/local/' in sc and ('/swa_rla/' in sc or '/swa/' in sc) and '/mix/' not in sc and '/rope/' not in sc:
        rows.append((e['dur'],a.get('shape','')[:40],a.get('detail','')[:70],sc.replace('backward/vjp/forward','B').replace('forward','F'), e['name']))
rows.sort(key=lambda r:r[3][0]+'%08.1f'%(1e5-r[0]))
print(sum(r[0] for r in rows)/1e3)
for r in rows: print('%7.1f %-40s %-70s %s'%(r[0],r[1],r[2],r[3]))
