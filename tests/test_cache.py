"""PagedKVCache: appends land in the right page slots, on the device, in place when donated."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm


def read_tokens(cache, layer, seq):
    """The stored tokens of one sequence, gathered through its block table on the host."""
    pages = np.asarray(cache.pages[layer])
    table = np.asarray(cache.block_table)[seq]
    length = int(cache.seqlens[seq])
    return np.stack([pages[table[t // 64], t % 64] for t in range(length)]) if length else np.zeros((0,))


def test_append_ragged_across_pages():
    rng = np.random.default_rng(0)
    # A scattered table: pages of both sequences interleaved in the pool.
    table = jnp.array([[4, 1, 6], [0, 5, 2]], jnp.int32)
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=192, num_layers=2, head_dim=8, dtype=jnp.float32,
                                    block_table=table, num_pages=7)
    prompt = rng.normal(size=(2, 70, 1, 8)).astype(np.float32)
    cache = cache.write(prompt, layer=1, num_new=jnp.array([70, 3], jnp.int32)).advance(jnp.array([70, 3]))
    np.testing.assert_array_equal(cache.seqlens, [70, 3])
    np.testing.assert_array_equal(read_tokens(cache, 1, 0), prompt[0])
    np.testing.assert_array_equal(read_tokens(cache, 1, 1), prompt[1, :3])
    assert np.all(np.asarray(cache.pages[0]) == 0)  # other layer untouched
    step = rng.normal(size=(2, 2, 1, 8)).astype(np.float32)
    cache = jax.jit(lambda c, kv: c.append(kv, layer=1))(cache, step)
    np.testing.assert_array_equal(read_tokens(cache, 1, 0), np.concatenate([prompt[0], step[0]]))
    np.testing.assert_array_equal(read_tokens(cache, 1, 1), np.concatenate([prompt[1, :3], step[1]]))
    # Untouched slots of the pool stay zero: only 72 + 5 tokens were written.
    assert np.count_nonzero(np.abs(np.asarray(cache.pages[1])).sum(-1)) == 77


def test_writes_past_capacity_are_dropped():
    cache = jfm.PagedKVCache.create(batch_size=1, max_seq_len=64, head_dim=4, dtype=jnp.float32)
    cache = cache.append(jnp.ones((1, 60, 1, 4)))
    cache = cache.append(2 * jnp.ones((1, 10, 1, 4)))  # only 4 fit
    assert int(cache.seqlens[0]) == 64
    pages = np.asarray(cache.pages[0, 0, :, 0, 0])
    np.testing.assert_array_equal(pages, [1] * 60 + [2] * 4)


def test_pytree_and_donation_updates_in_place():
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, num_layers=2, head_dim=576, dtype=jnp.bfloat16)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 3 and jax.tree_util.tree_unflatten(treedef, leaves).capacity == 128
    step = jax.jit(lambda c, kv: c.write(kv, layer=1).advance(1), donate_argnums=0)
    before = cache.pages.unsafe_buffer_pointer()
    new = step(cache, jnp.ones((2, 1, 1, 576), jnp.bfloat16))
    assert cache.pages.is_deleted()
    assert new.pages.unsafe_buffer_pointer() == before


def test_create_and_write_errors():
    with pytest.raises(ValueError, match="must be positive"):
        jfm.PagedKVCache.create(batch_size=0, max_seq_len=10)
    with pytest.raises(ValueError, match="num_pages is required"):
        jfm.PagedKVCache.create(batch_size=1, max_seq_len=10, block_table=jnp.zeros((1, 1), jnp.int32))
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=64, head_dim=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"kv must have shape \(2, s_new, 1, 8\)"):
        cache.write(jnp.ones((2, 1, 1, 16)))


def test_cache_feeds_the_decode(rng_seed):
    """Appended tokens are what the decode attends to: compare with attention on the raw tokens."""
    rng = np.random.default_rng(rng_seed)
    tokens = rng.normal(size=(1, 100, 1, 576)).astype(np.float32) / 10
    cache = jfm.PagedKVCache.create(batch_size=1, max_seq_len=200, head_dim=576, dtype=jnp.float32).append(tokens)
    q = rng.normal(size=(1, 1, 2, 576)).astype(np.float32) / 10
    out, lse = jfm.flash_mla_with_kvcache(q, cache.layer_pages(0), cache.block_table, cache.seqlens, 512)
    scores = np.einsum("hd,td->ht", q[0, 0].astype(np.float64), tokens[0, :, 0]) * 576**-0.5
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = weights @ tokens[0, :, 0, :512] / weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out[0, 0]), want, rtol=1e-4, atol=1e-6)


def test_layer_is_checked_and_clamped_as_the_decode_clamps_it():
    """A Python int layer must lie in range; a traced one is clamped into [0, L) (a negative one to 0), the decode's
    rule, so a write and a decode at the same traced index meet in the same layer."""
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=64, num_layers=3, head_dim=576, dtype=jnp.float32)
    kv = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 576)), jnp.float32)
    for layer, error, words in ((3, ValueError, r"layer must lie in \[0, 3\) for pages"), (-1, ValueError, "got -1"),
                                (1.7, TypeError, "layer must be a Python int"), (True, TypeError, "must be an int"),
                                (jnp.array([0, 1]), TypeError, "integer scalar array")):
        with pytest.raises(error, match=words):
            cache.write(kv, layer=layer)

    @jax.jit
    def write_then_read(cache, kv, layer):
        cache = cache.write(kv, layer=layer).advance(1)
        q = jnp.ones((2, 1, 1, 576), jnp.float32)
        out, _ = jfm.flash_mla_with_kvcache(q, cache.pages, cache.block_table, cache.seqlens, 512, layer=layer)
        return cache, out

    for index, layer in ((5, 2), (-1, 0), (1, 1)):
        written, out = write_then_read(cache, kv, jnp.int32(index))
        stored = np.abs(np.asarray(written.pages)).sum(axis=(1, 2, 3, 4))
        assert [bool(x) for x in stored] == [i == layer for i in range(3)], f"index {index}: {stored}"
        np.testing.assert_allclose(np.asarray(out), np.asarray(kv[..., :512]), rtol=1e-6, err_msg=f"index {index}")


def test_append_advances_by_what_it_stored():
    """num_new past s_new, negative or unsigned-huge never moves a length past the tokens written; advance keeps
    lengths within [0, capacity] whatever it is given, and rolls back with a negative count."""
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=4, dtype=jnp.float32)
    kv = jnp.ones((2, 3, 1, 4))
    np.testing.assert_array_equal(cache.append(kv[:, :2], num_new=jnp.array([5, 5])).seqlens, [2, 2])
    np.testing.assert_array_equal(cache.append(kv, num_new=jnp.array([-3, 1])).seqlens, [0, 1])
    np.testing.assert_array_equal(cache.append(kv, num_new=2).seqlens, [2, 2])  # an int: every row
    huge = jnp.array([2**32 - 1, 1], jnp.uint32)  # not -1 once in int32
    np.testing.assert_array_equal(cache.append(kv, num_new=huge).seqlens, [3, 1])
    assert np.count_nonzero(np.asarray(cache.append(kv, num_new=huge).pages)) == 4 * 4
    np.testing.assert_array_equal(cache.advance(-5).seqlens, [0, 0])
    for narrow in (jnp.uint8, jnp.uint16, jnp.int8):  # exact: a bound of 2**30 in their own type would wrap to 0
        np.testing.assert_array_equal(cache.advance(jnp.array([3, 7], narrow)).seqlens, [3, 7], err_msg=str(narrow))
    np.testing.assert_array_equal(cache.advance(10).advance(2**31 - 1).seqlens, [128, 128])
    np.testing.assert_array_equal(cache.advance(100).advance(jnp.array([-30, -200])).seqlens, [70, 0])
    # A length the decode reads as 0 (negative) is where writes start too: append stores slots 0.. and advances by as many.
    negative = dataclasses.replace(cache, seqlens=jnp.array([-3, 5], jnp.int32)).append(2 * kv)
    np.testing.assert_array_equal(negative.seqlens, [3, 8])
    np.testing.assert_array_equal(read_tokens(negative, 0, 0)[:, 0, 0], [2, 2, 2])
    # At the largest capacity (2**24 pages, 2**30 tokens) the int32 sum must not wrap.
    widest = jfm.PagedKVCache.create(batch_size=1, max_seq_len=2**30, head_dim=4, dtype=jnp.float32, num_pages=1,
                                     block_table=jnp.zeros((1, 2**24), jnp.int32))
    full = dataclasses.replace(widest, seqlens=jnp.array([2**30], jnp.int32))
    for step in (5, 2**30, 2**31 - 1, np.uint32(2**32 - 1)):
        np.testing.assert_array_equal(full.advance(step).seqlens, [2**30], err_msg=f"step {step}")
    np.testing.assert_array_equal(full.advance(-(2**31)).seqlens, [0])
    for bad in (2.9, jnp.array([1.0, 2.0]), jnp.array([[1], [2]]), jnp.array([1, 2, 3])):
        with pytest.raises(TypeError, match=r"num_new must be an int or a \(2,\) integer array"):
            cache.advance(bad)
    with pytest.raises(TypeError, match=r"num_new must be an int or a \(2,\) integer array"):
        cache.write(kv, num_new=jnp.array([1.5, 2.0]))


def test_create_and_write_refuse_bad_shapes():
    with pytest.raises(ValueError, match="block_table has 1 columns, fewer than the 64 pages max_seq_len=4096 needs"):
        jfm.PagedKVCache.create(batch_size=1, max_seq_len=4096, block_table=jnp.zeros((1, 1), jnp.int32), num_pages=1)
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=64, head_dim=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"kv must have shape \(2, s_new, 1, 8\), got shape \(5,\)"):
        cache.write(jnp.ones((5,)))
    with pytest.raises(TypeError, match="kv must be a floating-point array"):
        cache.write(jnp.ones((2, 1, 1, 8), jnp.int32))


@pytest.mark.parametrize("storage", [jnp.float8_e4m3fn, jnp.uint8])
def test_fp8_cache_packs_what_it_writes(storage, rng_seed):
    """An FP8 pool holds each written token as quantize_kv_cache packs it (float8 or, built by hand, uint8
    storage), in the slot a bf16 pool would use; slots nobody wrote stay zero."""
    rng = np.random.default_rng(rng_seed)
    table = jnp.asarray([[2, 0], [1, 3]], jnp.int32)
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, num_layers=2, head_dim=576,
                                    dtype=jnp.float8_e4m3fn, block_table=table, num_pages=4)
    assert cache.is_fp8 and cache.head_dim == 576 and cache.pages.shape == (2, 4, 64, 1, 656)
    if storage == jnp.uint8:
        cache = dataclasses.replace(cache, pages=jnp.zeros(cache.pages.shape, jnp.uint8))
        assert cache.is_fp8
    tokens = jnp.asarray(rng.standard_normal((2, 70, 1, 576)), jnp.bfloat16)
    cache = cache.write(tokens, layer=1, num_new=jnp.asarray([70, 3]))
    packed = np.asarray(jfm.quantize_kv_cache(tokens)).view(np.uint8)
    pool = np.asarray(cache.pages).view(np.uint8)
    for i, count in enumerate((70, 3)):
        for t in range(count):
            np.testing.assert_array_equal(pool[1, int(table[i, t // 64]), t % 64], packed[i, t])
    assert not pool[0].any() and not pool[1, 3].any() and not pool[1, 1, 3:].any()
    with pytest.raises(TypeError, match=r"dtype must be a floating-point type .* got uint8"):
        jfm.PagedKVCache.create(batch_size=1, max_seq_len=64, dtype=jnp.uint8)
    with pytest.raises(ValueError, match=r"an FP8 cache packs 576-dim tokens .* got head_dim=512"):
        jfm.PagedKVCache.create(batch_size=1, max_seq_len=64, head_dim=512, dtype=jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"kv must have shape \(2, s_new, 1, 576\)"):
        cache.write(jnp.zeros((2, 1, 1, 656)))
