"""The row algebra of the seesaw with JFM_P0_UNSCALED, with and without JFM_B_OWN_MAX (p0_unscaled_more.patch), in
float64 against a plain softmax: one query row, pages in pairs (K0 for A, K1 for B), each warpgroup's half of O
and its row sums kept apart as in the kernel, the same -inf guards (rescale_factor, exponentiate's m_use).

Cases: full pages, a partial last page, whole pages the row cannot see, a first page with logits 200 above the
rest, and a row that sees nothing. Run: python3 benchmarks/v2_10_prepared/own_max_check.py (prints the worst
absolute error; an assertion fails on any non-finite output)."""
import numpy as np
NEG = -np.inf
def rf(a, b): return np.exp2(a - (0.0 if b == NEG else b))
def mu(x): return 0.0 if x == NEG else x
def run(S, V, visible, c, own_max=True):
    # S: (pages, 64) scores, visible: (pages, 64) bool; pages processed in pairs (K0, K1)
    n = S.shape[0]; d = V.shape[2]
    m = NEG; OA = np.zeros(d); OB = np.zeros(d); sa = 0.0; sb = 0.0
    for i in range(0, n, 2):
        has_k1 = i + 1 < n
        s0 = np.where(visible[i], S[i], NEG)
        m0 = max(m, (s0.max() * c) if s0.size else NEG)
        sc0 = rf(m, m0)
        P0 = np.exp2(s0 * c - mu(m0))
        sa = sa * sc0 + P0.sum(); OA = OA * sc0 + P0 @ V[i]
        if has_k1:
            s1 = np.where(visible[i + 1], S[i + 1], NEG)
        if own_max:
            m1own = max(m, s1.max() * c) if has_k1 else m
            P1 = np.exp2(s1 * c - mu(m1own)) if has_k1 else None
            ts = P1.sum() if has_k1 else 0.0
            m1 = max(m0, m1own)
            sc1 = rf(m0, m1); own = rf(m1own, m1)
            OB = OB * sc0 + P0 @ V[i]
            sb = sb * (sc0 * sc1) + ts * own
            OB = OB * sc1
            if has_k1: OB = OB + (P1 * own) @ V[i + 1]
        else:  # pua
            m1 = max(m0, s1.max() * c) if has_k1 else m0
            sc1 = rf(m0, m1) if has_k1 else 1.0
            P1 = np.exp2(s1 * c - mu(m1)) if has_k1 else None
            ts = P1.sum() if has_k1 else 0.0
            OB = OB * sc0 + P0 @ V[i]
            sb = sb * (sc0 * sc1) + ts
            OB = OB * sc1
            if has_k1: OB = OB + P1 @ V[i + 1]
        sa *= sc1; OA = OA * sc1
        if has_k1: OA = OA + P1 @ V[i + 1] * (own if own_max else 1.0)
        m = m1
    tot = sa + sb
    return (OA / tot if tot > 0 else OA * 0), (OB / tot if tot > 0 else OB * 0), tot, m
rng = np.random.default_rng(0)
worst = 0.0
for trial in range(3000):
    n = int(rng.integers(1, 9))
    S = rng.normal(0, rng.choice([1, 5, 40]), size=(n, 64))
    V = rng.normal(size=(n, 64, 8))
    vis = np.ones((n, 64), bool)
    kind = trial % 5
    if kind == 1:  # causal-like: last page partial
        vis[-1, int(rng.integers(0, 64)):] = False
    elif kind == 2:  # some whole pages invisible (row sees nothing there)
        for p in range(n):
            if rng.random() < 0.4: vis[p] = False
    elif kind == 3:  # early pages huge, later tiny
        S[0] += 200
    elif kind == 4:  # nothing visible at all
        vis[:] = False
    c = 0.06
    OA, OB, tot, m = run(S, V, vis, c, own_max=True)
    OA2, OB2, tot2, m2 = run(S, V, vis, c, own_max=False)
    s = np.where(vis, S, NEG).reshape(-1) * c
    if np.isfinite(s).any():
        w = np.exp2(s - s.max()); ref = (w @ V.reshape(-1, 8)) / w.sum()
    else:
        ref = np.zeros(8)
    for o in (OA, OB, OA2, OB2):
        assert np.all(np.isfinite(o)), (trial, o)
        worst = max(worst, np.abs(o - ref).max())
print("worst |error| over 3000 trials:", worst)
