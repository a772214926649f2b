"""Rotary position embedding with YaRN context extension, as DeepSeek-V3 defines it.

DeepSeek-V3 applies RoPE only to the decoupled 64-dim query/key parts of MLA. Its checkpoints were
pre-trained at 4096 positions and extended with YaRN (factor 40). YaRN changes two things:

* the frequencies: dimensions that rotate fast (many turns within the original context) keep their
  frequency, slow ones are interpolated (divided by `factor`), with a linear ramp between;
* the attention temperature: `mscale(factor, mscale_all_dim)**2` multiplies the softmax scale, and
  `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` multiplies cos/sin. DeepSeek-V3 sets
  mscale == mscale_all_dim == 1, so the cos/sin factor is 1 and all of it lands in the softmax scale.

The formulas follow DeepSeek-V3's own inference code and HF transformers' "yarn" rope type (they agree).
Everything here is computed in float32 numpy at trace time: the tables are constants of the model.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN parameters; the defaults are DeepSeek-V3's `rope_scaling`."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"YaRN factor must be > 0, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"original_max_position_embeddings must be > 0, got {self.original_max_position_embeddings}"
            )
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"need beta_fast > beta_slow > 0, got {self.beta_fast}, {self.beta_slow}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(dim: int, theta: float, yarn: YarnScaling | None = None) -> np.ndarray:
    """Inverse frequencies (dim // 2,) float32 of RoPE over `dim` dims, YaRN-corrected when `yarn` is set."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rope dim must be a positive even number, got {dim}")
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    inv_freq = (1.0 / (theta**exponents)).astype(np.float32)
    if yarn is None:
        return inv_freq

    def correction_dim(num_rotations: float) -> float:
        # The dimension index whose wavelength fits `num_rotations` turns into the original context.
        return (dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: fast dims keep their frequency (extrapolate); 0: slow dims are interpolated
    return (inv_freq / yarn.factor * (1.0 - keep) + inv_freq * keep).astype(np.float32)


def rope_attention_factor(yarn: YarnScaling | None) -> float:
    """Factor on cos/sin (so on q_pe and k_pe alike). 1 for DeepSeek-V3 (mscale == mscale_all_dim)."""
    if yarn is None:
        return 1.0
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def mla_softmax_scale(qk_head_dim: int, yarn: YarnScaling | None) -> float:
    """Softmax scale of MLA: qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN.

    qk_head_dim is the *unabsorbed* head dim (nope + rope = 192 for DeepSeek-V3), also in absorbed decode,
    where the dot product runs over 576 latent dims but is mathematically the same 192-dim product.
    """
    scale = qk_head_dim**-0.5
    if yarn is not None and yarn.mscale_all_dim:
        scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


def apply_rope(
    x: jnp.ndarray,
    positions: jnp.ndarray,
    inv_freq: np.ndarray,
    attention_factor: float = 1.0,
    interleave: bool = True,
) -> jnp.ndarray:
    """Rotate x (b, s, heads, dim) by positions (b, s); computed in float32, returned in x's dtype.

    interleave=True is DeepSeek's layout: pairs (x[2i], x[2i+1]) rotate together and stay interleaved.
    interleave=False is the GPT-NeoX layout: pairs (x[i], x[i + dim/2]).
    Both give the same q.k products when q and k use the same layout; only the stored k_pe differs.
    Positions become float32 (as in DeepSeek's own code): past 2**24 neighbouring positions round together.
    """
    dim = x.shape[-1]
    if inv_freq.shape != (dim // 2,):
        raise ValueError(f"inv_freq has shape {inv_freq.shape}, expected ({dim // 2},) for rope dim {dim}")
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (b, s, dim/2)
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]  # broadcast over heads
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleave:
        pairs = xf.reshape(*xf.shape[:-1], dim // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(xf.shape)
    else:
        a, b = xf[..., : dim // 2], xf[..., dim // 2 :]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.astype(x.dtype)
