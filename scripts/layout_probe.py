"""Decode problems with exact, structured answers, to say *where* a decode kernel goes wrong, not only that it does.

The random problems of the GPU tests say that a result is off; these say which part of the kernel put it there.
Each probe's keys make the answer a known value per output element, exact in bf16 and fp16:
- `dim_low` / `dim_block`: Q = 0, so every key weighs the same; V[t, d] = d % 64 (or d // 64) for every token,
  so out[row, d] names the value dim that landed at d (the P V operand's and the epilogue's layout), and
  the row sums must meet across all tokens and warps (out = the code exactly, lse = ln L).
- `tokens`: key t is the one-hot e_t (L <= 384 tokens, several pages, so a ring of page tiles wraps), and query
  row r holds its own peak score 32 + r % 16 at dim tau(r) = (23 r + 7) mod L, with scale 1: out[row] = e_tau(row)
  up to e^-32, and lse = the row's peak. Which dim peaks says which token the row attended (S's and P's layout,
  Q's rows, the ring's tiles). Value dim 511 holds KV head h's marker h + 1 in every key: out[row, 511] says which
  KV head's keys the row read.
- `rope`: as `tokens`, but the scores come from the rope dims alone (token t of the first page at rope dim
  (5 t + 11) % 64, a permutation, so that the rope tile cannot pass for value dims 0-63).
- `causal` (s_q > 1): as `tokens`, causal, and each row's own token is the last key its query token may see,
  L - s_q + s; the next key, the first it must not see, scores 4 more. A mask off by one either way shows.
Sequences of 384, 300 and 81 tokens (partial pages; slots no sequence owns hold NaN) on a scattered block table,
scheduled over 1, 2, 8 and 32 SMs: single chunks written directly, several chunks per CTA, and 2- to 6-way splits
merged.

Usage (on the GPU, with the kernel picked as usual: the narrow kernel by default for at most 32 query rows,
JAX_FLASHMLA_DECODE_KERNEL=seesaw for the seesaw):
  python3 scripts/layout_probe.py [--h-q 16] [--s-q 1] [--h-kv 1]
Prints one line per probe and schedule, with a diagnosis where it fails; exits 1 if any failed. Without a GPU it
checks the pure-JAX reference (tests/test_layout_probe.py does).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from cases import UNUSED_PAGE_ID  # noqa: E402
from oracle import PAGE, decode_oracle  # noqa: E402

D, DV = 576, 512
HEAD_MARKER_DIM = DV - 1  # tokens and rope probes: value dim 511 holds the KV head's number + 1
LENGTHS = (384, 300, 81)
NUM_SMS = (1, 2, 8, 32)
PROBES = ("dim_low", "dim_block", "tokens", "rope", "causal")  # causal: s_q > 1 only
OUT_TOLERANCE = 1e-2  # absolute: the right values are exact codes (0-63) or 1 and 0 up to e^-32
LSE_TOLERANCE = 1e-3  # absolute: ln L, or a row's peak score up to 383 e^-32


@dataclasses.dataclass
class Probe:
    name: str
    q: np.ndarray  # (b, s_q, h_q, 576) float32 holding exact bf16/fp16 values
    k_cache: np.ndarray  # (pages, 64, h_kv, 576), NaN in slots no sequence owns
    block_table: np.ndarray
    seqlens: np.ndarray
    softmax_scale: float
    causal: bool


def target_token(name: str, row: int, length: int, s_q: int, h_q: int) -> int:
    """The token query row `row` (= s * h_q + h) attends in the `tokens`, `rope` and `causal` probes. For the first
    two, distinct rows get distinct tokens (23 is prime to every length used), spread over the pages and over each
    page's tokens; for `causal`, the last key its query token s may see."""
    if name == "causal":
        return length - s_q + row // h_q
    return (23 * row + 7) % (PAGE if name == "rope" else length)


def peak_score(row: int) -> float:
    """Query row `row`'s score for its own token: its LSE, different for neighbouring rows."""
    return 32.0 + row % 16


def rope_dim(token: int) -> int:
    return DV + (5 * token + 11) % PAGE


def build(name: str, *, s_q: int, h_q: int, h_kv: int, lengths=LENGTHS, seed: int = 0) -> Probe:
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    seqlens = np.asarray(lengths, np.int32)
    assert max(lengths) < HEAD_MARKER_DIM and min(lengths) >= PAGE and all(length % 23 for length in lengths)
    assert s_q * h_q <= (PAGE if name == "rope" else min(lengths)), "tau(row) must be distinct over a sequence's rows"
    assert name != "causal" or s_q > 1, "the causal probe needs s_q > 1"
    pages_needed = -(-seqlens // PAGE)
    max_pages = int(pages_needed.max()) + 1
    num_pages = int(pages_needed.sum()) + 2
    order = rng.permutation(num_pages).astype(np.int32)
    table = np.full((batch, max_pages), UNUSED_PAGE_ID, np.int32)
    k_cache = np.full((num_pages, PAGE, h_kv, D), np.nan, np.float32)
    q = np.zeros((batch, s_q, h_q, D), np.float32)
    cursor = 0
    for i, length in enumerate(lengths):
        n = int(pages_needed[i])
        table[i, :n] = order[cursor:cursor + n]
        cursor += n
        for t in range(length):
            key = np.zeros((h_kv, D), np.float32)
            if name == "dim_low":
                key[:, :DV] = np.arange(DV) % 64
            elif name == "dim_block":
                key[:, :DV] = np.arange(DV) // 64
            else:
                key[:, t] = 1.0  # V = e_t, and the `tokens` probe's scores
                key[:, HEAD_MARKER_DIM] = np.arange(h_kv) + 1  # Q is 0 there: no score
                if name == "rope" and t < PAGE:
                    key[:, rope_dim(t)] = 1.0
            k_cache[table[i, t // PAGE], t % PAGE] = key
        if name in ("tokens", "rope", "causal"):
            for s in range(s_q):
                for h in range(h_q):
                    row = s * h_q + h
                    tau = target_token(name, row, length, s_q, h_q)
                    q[i, s, h, rope_dim(tau) if name == "rope" else tau] = peak_score(row)
                    if name == "causal" and tau + 1 < length:
                        q[i, s, h, tau + 1] = peak_score(row) + 4  # must stay masked
    return Probe(name, q, k_cache, table, seqlens, 1.0, name == "causal")


def expected(probe: Probe):
    """float64 out (b, s_q, h_q, 512) and lse (b, h_q, s_q): the tests' independent oracle on the probe."""
    return decode_oracle(probe.q, probe.k_cache, probe.block_table, probe.seqlens, DV, probe.softmax_scale,
                         probe.causal)


def diagnose(probe: Probe, out: np.ndarray, lse: np.ndarray, want_out: np.ndarray, want_lse: np.ndarray,
             limit: int = 6) -> list[str]:
    """What is wrong with (out, lse) against the probe's answer, in the kernel's terms; [] when nothing is.
    out (b, s_q, h_q, 512) and lse (b, h_q, s_q) as the decode returns them, as float arrays."""
    batch, s_q, h_q, _ = out.shape
    group = h_q // probe.k_cache.shape[2]
    findings: list[str] = []
    bad_out = ~(np.abs(out - want_out) <= OUT_TOLERANCE)
    bad_lse = ~(np.abs(lse - want_lse) <= LSE_TOLERANCE)
    if not bad_out.any() and not bad_lse.any():
        return findings
    if bad_out.any():
        findings.append(f"out: {int(bad_out.sum())} of {bad_out.size} values wrong "
                        f"({int(np.isnan(out).sum())} NaN), in {int(bad_out.any(axis=3).sum())} of {batch * s_q * h_q} rows")
    rows = [(i, s, h) for i in range(batch) for s in range(s_q) for h in range(h_q) if bad_out[i, s, h].any()]
    if probe.name.startswith("dim_"):
        findings += _diagnose_dims(probe.name, out, bad_out, rows, limit)
    else:
        findings += _diagnose_tokens(probe, out, rows, group, limit)
    if len(rows) > limit:
        findings.append(f"... and {len(rows) - limit} more rows")
    if bad_lse.any():
        where = np.argwhere(bad_lse)[:limit]
        findings.append(f"lse: {int(bad_lse.sum())} of {bad_lse.size} wrong, e.g. "
                        + ", ".join(f"(seq {i}, head {h}, s {s}) {lse[i, h, s]:.4f} wants {want_lse[i, h, s]:.4f}"
                                    for i, h, s in where))
    return findings


def _diagnose_dims(name, out, bad_out, rows, limit):
    """Each value should be its own dim's code: a wrong whole code names the dim whose code it holds; anything else
    is a mix of dims, or a wrong weight."""
    findings = []
    deltas: dict[int, int] = {}
    mixed = 0
    for i, s, h in rows:
        for d in np.flatnonzero(bad_out[i, s, h]):
            got = out[i, s, h, d]
            code = d % 64 if name == "dim_low" else d // 64
            if np.isfinite(got) and abs(got - round(got)) <= OUT_TOLERANCE:
                deltas[int(round(got)) - code] = deltas.get(int(round(got)) - code, 0) + 1
            else:
                mixed += 1
    if deltas:
        unit = "dims within a 64-dim tile" if name == "dim_low" else "64-dim tiles"
        top = sorted(deltas.items(), key=lambda kv: -kv[1])[:limit]
        findings.append(f"wrong values that are whole codes, off by ({unit}): "
                        + ", ".join(f"{k:+d} x{n}" for k, n in top))
    if mixed:
        findings.append(f"{mixed} wrong values are not whole codes: a mix of dims, a wrong weight, or not finite")
    for i, s, h in rows[:limit]:
        dims = np.flatnonzero(bad_out[i, s, h])
        findings.append(f"seq {i} s {s} head {h}: {len(dims)} dims wrong, first {dims[:8].tolist()} hold "
                        f"{np.round(out[i, s, h, dims[:8]], 3).tolist()}")
    return findings


def _diagnose_tokens(probe, out, rows, group, limit):
    """Each row should be the one-hot of its own token (and KV head's marker): where it peaks says which token
    the row attended instead, and whose token that was."""
    findings = []
    batch, s_q, h_q, _ = out.shape
    owners = [{target_token(probe.name, s * h_q + h, int(probe.seqlens[i]), s_q, h_q): (s, h)
               for s in range(s_q) for h in range(h_q)} for i in range(batch)]
    for i, s, h in rows[:limit]:
        row = out[i, s, h]
        want = target_token(probe.name, s * h_q + h, int(probe.seqlens[i]), s_q, h_q)
        where = f"seq {i} s {s} head {h}"
        if not np.isfinite(row).all():
            findings.append(f"{where}: {int((~np.isfinite(row)).sum())} values not finite")
            continue
        tokens = row[:HEAD_MARKER_DIM]
        got = int(np.argmax(tokens))
        if tokens[got] < 0.25:
            findings.append(f"{where}: no single token; its largest value is {tokens[got]:.3f} (dim {got}), and the "
                            f"row sums to {tokens.sum():.3f} (wants 1 at token {want})")
        elif got == want:
            findings.append(f"{where}: its own token {want}, with weight {tokens[got]:.3f}; the row sums to "
                            f"{tokens.sum():.3f} (wants 1): a normalisation or merge fault")
        elif probe.name == "causal" and got == want + 1:
            findings.append(f"{where}: peaks {tokens[got]:.3f} at token {got}, the first key its query token must not "
                            f"see: the causal mask lets it through")
        else:
            owner = owners[i].get(got) if probe.name != "causal" else None
            whose = f"; that is query row (s {owner[0]}, head {owner[1]})'s token" if owner else ""
            findings.append(f"{where}: peaks {tokens[got]:.3f} at dim {got} (token {got % PAGE} of page {got // PAGE},"
                            f" if the dim probes pass{whose}), wants token {want % PAGE} of page {want // PAGE}")
        marker, want_marker = row[HEAD_MARKER_DIM], h // group + 1
        if abs(marker - want_marker) > OUT_TOLERANCE:
            if abs(marker - round(marker)) <= OUT_TOLERANCE and round(marker) >= 1:
                whose = f"the keys of KV head {round(marker) - 1}"
            else:
                whose = "weights that do not sum to 1, or a mix of KV heads"
            findings.append(f"{where}: dim {HEAD_MARKER_DIM} holds {marker:.3f}: {whose}, wants KV head "
                            f"{want_marker - 1}")
    return findings


def run(probe: Probe, dtype, num_sms: int):
    """The decode of the probe through the public API (the CUDA kernels where available), outputs poisoned."""
    import jax.numpy as jnp

    out, lse = _jitted_decode()(jnp.asarray(probe.q, dtype), jnp.asarray(probe.k_cache, dtype),
                                jnp.asarray(probe.block_table), jnp.asarray(probe.seqlens), num_sms,
                                probe.softmax_scale, probe.causal)
    return np.asarray(out, np.float64), np.asarray(lse, np.float64)


@functools.cache
def _jitted_decode():
    import jax
    import jax_flashmla as jfm

    def decode(q, k_cache, block_table, seqlens, num_sms, softmax_scale, causal):
        s_q, h_q, h_kv = q.shape[1], q.shape[2], k_cache.shape[2]
        md, splits = jfm.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, num_sms=num_sms)
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, DV, md, splits,
                                          softmax_scale=softmax_scale, causal=causal, poison_outputs=True)

    # One compile per shape, dtype, schedule and mask, shared by the probes.
    return jax.jit(decode, static_argnums=(4, 5, 6))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h-q", type=int, default=16)
    parser.add_argument("--s-q", type=int, default=1)
    parser.add_argument("--h-kv", type=int, default=1)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--probes", default=",".join(PROBES))
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import jax_flashmla as jfm

    kernel = os.environ.get("JAX_FLASHMLA_DECODE_KERNEL", "(default)")
    combine = os.environ.get("JAX_FLASHMLA_COMBINE", "(default)")
    on_gpu = jax.default_backend() == "gpu"
    where = ("CUDA kernels" if jfm.kernels_available() else f"reference: {jfm.why_kernels_unavailable()}") if on_gpu \
        else "the pure-JAX reference (no GPU)"
    print(f"layout probe: {jax.devices()[0].device_kind}, {where}, JAX_FLASHMLA_DECODE_KERNEL={kernel}, "
          f"JAX_FLASHMLA_COMBINE={combine}, s_q {args.s_q}, h_q {args.h_q}, h_kv {args.h_kv}", flush=True)
    if on_gpu and not jfm.kernels_available():
        return 2  # the reference would pass for the kernels
    failed = 0
    for name in args.probes.split(","):
        if name == "causal" and args.s_q == 1:
            continue  # one query token sees every key, causal or not
        probe = build(name, s_q=args.s_q, h_q=args.h_q, h_kv=args.h_kv)
        want_out, want_lse = expected(probe)
        for dtype_name in args.dtypes.split(","):
            for num_sms in NUM_SMS:
                out, lse = run(probe, getattr(jnp, dtype_name), num_sms)
                findings = diagnose(probe, out, lse, want_out, want_lse)
                failed += bool(findings)
                print(f"{name:9s} {dtype_name:8s} {num_sms} SMs: {'FAIL' if findings else 'ok'}", flush=True)
                for line in findings:
                    print("    " + line, flush=True)
    print(f"layout probe: {failed} failed" if failed else "layout probe: all ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
