import os, jax, numpy as np
from jax_flashmla import bench, get_mla_metadata
cfg = bench.RowConfig(128, int(os.environ.get("S_K", 16384)), int(os.environ.get("S_Q", 2)),
                      int(os.environ.get("H_Q", 128)), 1, False, "bfloat16")
lengths = bench.sample_lengths(cfg, False, 0)
q, k, t, s = bench.make_inputs(jax.random.PRNGKey(0), lengths, cfg)
md = get_mla_metadata(s, cfg.s_q * cfg.h_q, 1)
f = jax.jit(lambda q, k, t, s, a, b: bench._decode_with_metadata(q, k, t, s, a, b, causal=False, layer=None))
for _ in range(4):
    jax.block_until_ready(f(q, k, t, s, *md))
