#!/usr/bin/env python3
"""The library's module graph, from `use crate::` paths and inline `crate::` paths in src/
(not src/bin/). Prints each module's imports and any cycle; exits 1 if there is one.
A module is a file under src/ (src/a/b.rs is a::b; src/a/mod.rs is a)."""
import os, re, sys
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src')
mods = {}
for dp, dn, fn in os.walk(root):
    if os.path.relpath(dp, root).split(os.sep)[0] == 'bin':
        continue
    for f in fn:
        if not f.endswith('.rs'):
            continue
        rel = os.path.relpath(os.path.join(dp, f), root)[:-3].split(os.sep)
        if rel[-1] == 'mod':
            rel = rel[:-1]
        name = '::'.join(rel)
        if name == 'lib':
            continue
        mods[name] = open(os.path.join(dp, f)).read()

def strip(src):
    src = re.sub(r'//[^\n]*', '', src)
    return src

def paths(src):
    out = set()
    src = strip(src)
    # use crate::{a, b::{c, d}, e::f};  and crate::a::b inline
    for m in re.finditer(r'use\s+crate::\{', src):
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {'{': 1, '}': -1}.get(src[i], 0); i += 1
        body = src[m.end():i - 1]
        for item in expand('', body):
            out.add(item)
    for m in re.finditer(r'crate::((?:[a-z_][a-z0-9_]*::)*[A-Za-z_][A-Za-z0-9_]*)', src):
        out.add(m.group(1))
    return out

def expand(prefix, body):
    items, depth, cur = [], 0, ''
    for ch in body:
        if ch == ',' and depth == 0:
            items.append(cur); cur = ''; continue
        depth += {'{': 1, '}': -1}.get(ch, 0); cur += ch
    items.append(cur)
    res = []
    for it in items:
        it = it.strip()
        if not it:
            continue
        if '{' in it:
            head = it[:it.index('{')].rstrip(':').strip()
            res += expand(prefix + head + '::', it[it.index('{') + 1:it.rindex('}')])
        else:
            res.append(prefix + it.split(' as ')[0].strip())
    return res

def resolve(p):
    parts = p.split('::')
    for k in range(len(parts), 0, -1):
        cand = '::'.join(parts[:k])
        if cand in mods:
            return cand
    return None

graph = {}
for name, src in mods.items():
    deps = set()
    for p in paths(src):
        t = resolve(p)
        if t and t != name and not t.startswith(name + '::') and not name.startswith(t + '::'):
            deps.add(t)
        elif t and name.startswith(t + '::') and t != name:
            # a child naming its parent module counts as an edge to the parent
            deps.add(t)
    graph[name] = deps

for n in sorted(graph):
    print(f'{n} -> {" ".join(sorted(graph[n]))}')
# cycles: Tarjan SCC
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
def sc(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            sc(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
sys.setrecursionlimit(10000)
for v in graph:
    if v not in index: sc(v)
if sccs:
    for c in sccs:
        print('cycle:', ' '.join(sorted(c)))
    sys.exit(1)
print('no cycle')
