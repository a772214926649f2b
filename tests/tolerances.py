"""The one place that says how close the kernels' results must be to the float32 reference.

The kernels read the same bf16/fp16 inputs as the reference and accumulate in float32. The Hopper kernel,
like FlashMLA, also rounds the softmax probabilities P to the input type before the P·V product (the tensor
cores take 16-bit operands), and `out` is rounded once to the output type. Both roundings are relative to
the size of each query row's output, so the bound scales with the rms of that row (its dv values): a short
sequence has a larger output than a long one, and a batch-wide scale would let the long sequences hide
errors while flagging the short ones' legitimate rounding. lse is float32 end to end.
"""

import numpy as np
import jax.numpy as jnp

# float32 outputs (the reference against the float64 oracle) carry no final rounding of note but sums of
# thousands of float32 terms: 2^-18 covers that accumulation.
UNIT_ROUNDOFF = {np.dtype(jnp.bfloat16): 2.0**-8, np.dtype(jnp.float16): 2.0**-11, np.dtype(np.float32): 2.0**-18}
OUT_ROUNDING_UNITS = 4  # elementwise: |out - ref| <= 4 u (|ref| + rms of ref's row)
LSE_ABS = 2e-3


def assert_out_close(out, ref, dtype, what="out"):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(ref).any(), f"{what}: the reference itself has NaN"
    assert not np.isnan(out).any(), f"{what}: NaN in {np.isnan(out).sum()} elements (unwritten or poisoned)"
    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    # Each query row's own scale: rms over the last axis (dv); an all-zero row (empty sequence) must be exact.
    scale = np.sqrt(np.mean(ref**2, axis=-1, keepdims=True)) if ref.size else 0.0
    bound = OUT_ROUNDING_UNITS * u * (np.abs(ref) + scale) + 1e-30
    excess = np.abs(out - ref) / bound
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert excess.size == 0 or excess.max() <= 1.0, (
        f"{what}: {int((excess > 1).sum())} elements off; worst at {worst}: got {out[worst]}, want {ref[worst]}")


def assert_lse_close(lse, ref, what="lse"):
    lse = np.asarray(lse, np.float64)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(lse).any(), f"{what}: NaN in {np.isnan(lse).sum()} elements"
    inf = np.isinf(ref)
    np.testing.assert_array_equal(lse[inf], ref[inf], err_msg=f"{what}: +inf (query saw no key) mismatch")
    np.testing.assert_allclose(lse[~inf], ref[~inf], atol=LSE_ABS, rtol=0, err_msg=what)
