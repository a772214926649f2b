"""Shows whether XLA copies a layer sliced out of a stacked KV pool before the decode's custom call.

Usage: python3 scripts/layer_slice_hlo.py   (on the GPU machine, after the package is built)
Compiles three jitted decodes over a two-layer pool and prints, for each, the optimized-HLO lines that touch
the pool: the layer given as a static slice (pages[1]), as `layer=1` (read in place by the kernels), and as
a dynamic slice inside a loop. A `copy` of a bf16[512,64,1,576] buffer would be the layer copied; a
`dynamic-slice-fusion` means XLA passed the custom call an offset into the pool instead.
"""
import re

import jax
import jax.numpy as jnp

from jax_flashmla import flash_mla_with_kvcache

LAYERS, PAGES, BATCH, SEQLEN = 2, 512, 8, 4096
POOL_LAYER_SHAPE = "512,64,1,576"


def show(name, fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    ops = re.findall(r"^\s*\S+ = \S+ (\w[\w-]*)\(", text, re.M)
    print("==", name, "ops:", {op: ops.count(op) for op in sorted(set(ops))})
    for line in text.splitlines():
        touches_pool = POOL_LAYER_SHAPE in line and any(k in line for k in ("slice", "copy", "fusion", "custom"))
        if touches_pool or "slice_fusion" in line or "slice-fusion" in line:
            print("  ", line.strip()[:300])


def main():
    q = jnp.ones((BATCH, 1, 16, 576), jnp.bfloat16)
    pools = jnp.ones((LAYERS, PAGES, 64, 1, 576), jnp.bfloat16)
    table = jnp.arange(BATCH * 64, dtype=jnp.int32).reshape(BATCH, 64) % PAGES
    seqlens = jnp.full((BATCH,), SEQLEN, jnp.int32)

    def decode(q, pool, table, seqlens, **kw):
        return flash_mla_with_kvcache(q, pool, table, seqlens, 512, **kw)[0]

    show("static slice pages[1]", lambda q, p, t, s: decode(q, p[1], t, s), q, pools, table, seqlens)
    show("in place, layer=1", lambda q, p, t, s: decode(q, p, t, s, layer=1), q, pools, table, seqlens)

    def loop_over_layers(q, p, t, s):
        body = lambda i, acc: acc + decode(q, jax.lax.dynamic_index_in_dim(p, i, keepdims=False), t, s).sum()
        return jax.lax.fori_loop(0, LAYERS, body, 0.0)

    show("dynamic slice in a loop", loop_over_layers, q, pools, table, seqlens)


if __name__ == "__main__":
    main()
