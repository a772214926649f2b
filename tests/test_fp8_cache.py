"""fp8_cache.py: DeepSeek-V3.2's packed FP8 token, byte for byte against a NumPy packer written from the layout."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla.fp8_cache import FP8_TOKEN_BYTES


def numpy_pack(x):
    """(..., 576) float32 -> (..., 656) uint8: 4 tiles of 128 fp8 values, 4 little-endian float32 scales (powers of
    two, 2 ** ceil(log2(max(amax / 448, 1e-4))) with amax / 448 in float32), 64 bfloat16 rope dims."""
    x = np.asarray(x, np.float32)
    tiles = x[..., :512].reshape(*x.shape[:-1], 4, 128)
    needed = np.maximum(np.abs(tiles).max(-1) / np.float32(448), np.float32(1e-4)).astype(np.float64)
    scales = np.exp2(np.ceil(np.log2(needed))).astype(np.float32)
    values = (tiles / scales[..., None]).astype(ml_dtypes.float8_e4m3fn).reshape(*x.shape[:-1], 512)
    return np.concatenate([values.view(np.uint8), scales.astype("<f4").view(np.uint8).reshape(*x.shape[:-1], 16),
                           x[..., 512:].astype(ml_dtypes.bfloat16).view(np.uint8).reshape(*x.shape[:-1], 128)], -1)


def numpy_unpack(raw):
    """(..., 656) uint8 -> (..., 576) float64, from the same layout."""
    values = raw[..., :512].view(ml_dtypes.float8_e4m3fn).astype(np.float64).reshape(*raw.shape[:-1], 4, 128)
    scales = raw[..., 512:528].copy().view("<f4").astype(np.float64)
    rope = raw[..., 528:].copy().view(ml_dtypes.bfloat16).astype(np.float64)
    return np.concatenate([(values * scales[..., None]).reshape(*raw.shape[:-1], 512), rope], -1)


def tokens(rng, shape):
    """Tokens whose tiles span magnitudes: ordinary, all zero, below the scale floor, huge, and amax exactly 448 * 2^k
    (where a log2 rounded in float32 would pick the next power of two)."""
    x = rng.standard_normal((*shape, 576)).astype(np.float32)
    flat = x.reshape(-1, 576)
    flat[0, :128] = 0.0
    flat[1, 128:256] *= 1e-7
    flat[2, 256:384] *= 1e3  # (float16 holds it too)
    flat[3, 384:512] = np.clip(flat[3, 384:512], -1, 1)
    flat[3, 400] = -448.0 * 2.0**-5
    flat[4, :128] = np.clip(flat[4, :128], -1, 1) * 447.0
    flat[4, 5] = 448.0
    return x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_packing_is_the_layout_byte_for_byte(dtype, rng_seed):
    rng = np.random.default_rng(rng_seed)
    x = np.asarray(jnp.asarray(tokens(rng, (3, 64, 1)), dtype), np.float32)  # values the dtype holds
    packed = jax.jit(jfm.quantize_kv_cache)(jnp.asarray(x, dtype))
    assert packed.shape == (3, 64, 1, FP8_TOKEN_BYTES) and packed.dtype == jnp.float8_e4m3fn
    raw = np.asarray(packed).view(np.uint8)
    np.testing.assert_array_equal(raw, numpy_pack(x))
    scales = raw[..., 512:528].copy().view("<f4")
    assert np.all(np.log2(scales) == np.round(np.log2(scales))), "scales are powers of two"
    # The exact-power-of-two tiles: 448 * 2^-5 needs a scale of 2^-5, and 448 a scale of 1 (not twice that).
    assert scales.reshape(-1, 4)[3, 3] == 2.0**-5 and scales.reshape(-1, 4)[4, 0] == 1.0
    assert scales.reshape(-1, 4)[0, 0] == 2.0**-13  # an all-zero tile: the floor, 1e-4, rounded up


def test_unpacking_is_exact_and_round_trips(rng_seed):
    rng = np.random.default_rng(rng_seed)
    x = tokens(rng, (2, 64, 1))
    raw = numpy_pack(x)
    want = numpy_unpack(raw)
    for packed in (jnp.asarray(raw), jnp.asarray(raw).view(jnp.float8_e4m3fn)):  # uint8 or float8 storage
        for dtype in (jnp.bfloat16, jnp.float32):
            got = jax.jit(jfm.dequantize_kv_cache, static_argnums=1)(packed, dtype)
            assert got.dtype == dtype
            np.testing.assert_array_equal(np.asarray(got, np.float64), want)  # exact: power-of-two scales
    # Quantisation error: half a float8 step of each value (2^-4 relative), or of the tile's smallest step.
    scales = np.repeat(raw[..., 512:528].copy().view("<f4"), 128, axis=-1).astype(np.float64)
    err = np.abs(want[..., :512] - x[..., :512])
    assert np.all(err <= np.maximum(np.abs(x[..., :512]) * 2.0**-4, scales * 2.0**-10))
    np.testing.assert_array_equal(want[..., 512:], np.asarray(jnp.asarray(x[..., 512:], jnp.bfloat16), np.float64))
    # Packing what was unpacked changes nothing it decodes to.
    again = jfm.dequantize_kv_cache(jfm.quantize_kv_cache(jnp.asarray(want, jnp.float32)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(again, np.float64), want)


def test_a_non_finite_value_makes_its_whole_tile_nan(rng_seed):
    """As with FlashMLA's 2 ** ceil(log2(amax / 448)): the tile's scale is inf or NaN, every value of the tile
    unpacks to NaN, the other tiles and the rope dims are untouched."""
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    x[0, 5], x[1, 200], x[2, 400] = np.inf, np.nan, -np.inf
    got = np.asarray(jfm.dequantize_kv_cache(jfm.quantize_kv_cache(x), jnp.float32))
    for token, tile in ((0, 0), (1, 1), (2, 3)):
        assert np.isnan(got[token, tile * 128:(tile + 1) * 128]).all()
        others = np.delete(got[token], np.s_[tile * 128:(tile + 1) * 128])
        assert np.isfinite(others).all()


def test_packing_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"floating-point tokens of 576 dims .* got shape \(2, 512\)"):
        jfm.quantize_kv_cache(jnp.zeros((2, 512)))
    with pytest.raises(ValueError, match=r"got shape \(2, 576\) and dtype int32"):
        jfm.quantize_kv_cache(jnp.zeros((2, 576), jnp.int32))
    with pytest.raises(ValueError, match=r"packed FP8 tokens \(\.\.\., 656\) .* got shape \(2, 656\) and dtype "
                                         r"bfloat16"):
        jfm.dequantize_kv_cache(jnp.zeros((2, 656), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"got shape \(2, 576\) and dtype uint8"):
        jfm.dequantize_kv_cache(jnp.zeros((2, 576), jnp.uint8))
