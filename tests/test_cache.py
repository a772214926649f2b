"""PagedKVCache: appends land in the right page slots, on the device, in place when donated."""

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
