"""DeepSeek-V3.2's FP8 KV-cache layout (FlashMLA's "FP8 + sparse" format), packed and unpacked in JAX.

Each token of a latent KV cache (..., 576) becomes 656 bytes, held as float8_e4m3fn like FlashMLA's tensor:
  bytes [0, 512)   the 512 latent ("NoPE") dims as float8_e4m3fn, in 4 tiles of 128 dims;
  bytes [512, 528) 4 float32 scales (little-endian), one per tile: a dim's value is its fp8 value times the scale;
  bytes [528, 656) the 64 rope dims as bfloat16, not quantised.
A tile's scale is 2 ** ceil(log2(max(amax / 448, 1e-4))), amax its largest magnitude: a power of two, so the
largest magnitude quantises to at most 448 (float8_e4m3fn's largest finite value) and unpacking is exact in
bfloat16. A NaN or infinity in a tile makes that tile's scale non-finite, and every value of the tile unpacks to
NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NOPE_DIMS = 512  # the latent dims, quantised
ROPE_DIMS = 64  # the decoupled rope dims, kept in bfloat16
TILE_DIMS = 128  # latent dims that share one scale
NUM_TILES = NOPE_DIMS // TILE_DIMS
HEAD_DIM = NOPE_DIMS + ROPE_DIMS  # 576: what a token unpacks to
SCALE_OFFSET = NOPE_DIMS  # byte offsets of the three parts of a packed token
ROPE_OFFSET = SCALE_OFFSET + 4 * NUM_TILES
FP8_TOKEN_BYTES = ROPE_OFFSET + 2 * ROPE_DIMS  # 656
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
SCALE_FLOOR = 1e-4  # smallest amax / 448 a scale is derived from: all-zero tiles get 2 ** -13, not 0


def is_packed_fp8(x) -> bool:
    """Does x hold packed FP8 tokens: float8_e4m3fn or uint8 with FP8_TOKEN_BYTES in its last axis."""
    return np.dtype(x.dtype) in (np.dtype(jnp.float8_e4m3fn), np.dtype(np.uint8)) and x.shape[-1] == FP8_TOKEN_BYTES


def _tile_scales(nope):
    """(..., NUM_TILES, TILE_DIMS) float32 -> (..., NUM_TILES) power-of-two scales, computed exactly."""
    needed = jnp.maximum(jnp.max(jnp.abs(nope), axis=-1) / FP8_MAX, SCALE_FLOOR)
    # ceil(log2(needed)) from the exponent itself: log2 rounded in float32 could be off by one at powers of two.
    mantissa, exponent = jnp.frexp(needed)  # needed = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    # frexp gives exponent 0 for inf and NaN: such a tile keeps its non-finite scale (every value then unpacks
    # to NaN), as 2 ** ceil(log2(.)) would give.
    return jnp.where(jnp.isfinite(needed), jnp.ldexp(jnp.ones_like(needed), exponent), needed)


def quantize_kv_cache(k_cache):
    """(..., 576) float latent KV (bf16, fp16 or fp32) -> (..., 656) float8_e4m3fn packed tokens.

    Any leading shape: a pool (num_pages, page_size, h_kv, 576), a stacked pool of all layers, or new tokens
    (b, s_new, h_kv, 576) before they are written. The rope dims are rounded to bfloat16.
    """
    k_cache = jnp.asarray(k_cache)
    if not jnp.issubdtype(k_cache.dtype, jnp.floating) or k_cache.ndim == 0 or k_cache.shape[-1] != HEAD_DIM:
        raise ValueError(f"quantize_kv_cache takes floating-point tokens of {HEAD_DIM} dims (..., {HEAD_DIM}), got "
                         f"shape {tuple(k_cache.shape)} and dtype {np.dtype(k_cache.dtype).name}")
    lead = k_cache.shape[:-1]
    nope = k_cache[..., :NOPE_DIMS].astype(jnp.float32).reshape(*lead, NUM_TILES, TILE_DIMS)
    scales = _tile_scales(nope)
    values = (nope / scales[..., None]).astype(jnp.float8_e4m3fn).reshape(*lead, NOPE_DIMS)
    parts = (jax.lax.bitcast_convert_type(values, jnp.uint8),
             jax.lax.bitcast_convert_type(scales, jnp.uint8).reshape(*lead, 4 * NUM_TILES),
             jax.lax.bitcast_convert_type(k_cache[..., NOPE_DIMS:].astype(jnp.bfloat16), jnp.uint8)
             .reshape(*lead, 2 * ROPE_DIMS))
    return jax.lax.bitcast_convert_type(jnp.concatenate(parts, axis=-1), jnp.float8_e4m3fn)


def dequantize_kv_cache(packed, dtype=jnp.bfloat16):
    """(..., 656) packed tokens (float8_e4m3fn or uint8) -> (..., 576) in dtype (exact in bfloat16 or float32)."""
    packed = jnp.asarray(packed)
    if packed.ndim == 0 or not is_packed_fp8(packed):
        raise ValueError(f"dequantize_kv_cache takes packed FP8 tokens (..., {FP8_TOKEN_BYTES}) of float8_e4m3fn or "
                         f"uint8, got shape {tuple(packed.shape)} and dtype {np.dtype(packed.dtype).name}")
    lead = packed.shape[:-1]
    raw = packed if packed.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(packed, jnp.uint8)
    values = jax.lax.bitcast_convert_type(raw[..., :NOPE_DIMS], jnp.float8_e4m3fn).astype(jnp.float32)
    scales = jax.lax.bitcast_convert_type(raw[..., SCALE_OFFSET:ROPE_OFFSET].reshape(*lead, NUM_TILES, 4), jnp.float32)
    rope = jax.lax.bitcast_convert_type(raw[..., ROPE_OFFSET:].reshape(*lead, ROPE_DIMS, 2), jnp.bfloat16)
    nope = (values.reshape(*lead, NUM_TILES, TILE_DIMS) * scales[..., None]).reshape(*lead, NOPE_DIMS)
    return jnp.concatenate([nope, rope.astype(jnp.float32)], axis=-1).astype(dtype)
