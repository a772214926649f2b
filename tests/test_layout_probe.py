"""scripts/layout_probe.py: its answers are right (the reference meets them on fresh structured problems), and
its diagnoses name the faults a layout slip in a kernel would make, given outputs with such faults put in."""

import importlib.util
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "layout_probe.py"
_SPEC = importlib.util.spec_from_file_location("layout_probe", _PATH)
probe_script = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = probe_script  # its dataclass looks its module up
_SPEC.loader.exec_module(probe_script)


@pytest.fixture(scope="module")
def tokens_probe():
    probe = probe_script.build("tokens", s_q=2, h_q=8, h_kv=1)
    return probe, *probe_script.expected(probe)


@pytest.mark.parametrize("name,s_q,h_q,h_kv", [(name, *shape) for name in probe_script.PROBES
                                                for shape in ((1, 16, 1), (2, 16, 2), (3, 8, 1))
                                                if name != "causal" or shape[0] > 1])  # causal needs s_q > 1
def test_reference_meets_the_probes(name, s_q, h_q, h_kv, rng_seed):
    """Through the public API (the pure-JAX reference here; the kernels on a GPU), split and unsplit schedules."""
    probe = probe_script.build(name, s_q=s_q, h_q=h_q, h_kv=h_kv, seed=rng_seed)
    want_out, want_lse = probe_script.expected(probe)
    for num_sms in (1, 8):
        out, lse = probe_script.run(probe, jnp.bfloat16, num_sms)
        assert probe_script.diagnose(probe, out, lse, want_out, want_lse) == []


def test_probe_values_are_exact_in_16_bits():
    for name in probe_script.PROBES:
        probe = probe_script.build(name, s_q=2, h_q=16, h_kv=1)
        for dtype in (jnp.bfloat16, jnp.float16):
            for array in (probe.q, probe.k_cache):
                rounded = np.asarray(jnp.asarray(array, dtype), np.float32)
                assert np.array_equal(rounded, array, equal_nan=True), (name, dtype)
        # Owned slots are finite, and every page a sequence uses holds NaN past its length (a partial page).
        assert np.isfinite(probe.q).all()
        assert np.isnan(probe.k_cache).any()


def test_answers_have_the_structure_the_diagnosis_reads():
    probe = probe_script.build("dim_low", s_q=1, h_q=4, h_kv=1)
    out, lse = probe_script.expected(probe)
    assert np.array_equal(out[0, 0, 0], np.arange(512) % 64)
    assert np.allclose(lse[:, 0, 0], np.log(probe_script.LENGTHS))
    marker = probe_script.HEAD_MARKER_DIM
    for name in ("tokens", "rope", "causal"):
        probe = probe_script.build(name, s_q=2, h_q=4, h_kv=2)
        out, lse = probe_script.expected(probe)
        for i, length in enumerate(probe.seqlens):
            for s in range(2):
                for h in range(4):
                    row = s * 4 + h
                    tau = probe_script.target_token(name, row, int(length), 2, 4)
                    assert np.argmax(out[i, s, h, :marker]) == tau and out[i, s, h, tau] > 0.999
                    assert out[i, s, h, marker] == pytest.approx(h // 2 + 1)  # its KV head's keys
                    assert lse[i, h, s] == pytest.approx(probe_script.peak_score(row), abs=1e-9)
        assert len({probe_script.peak_score(r) for r in range(8)}) == 8  # neighbouring rows' LSEs differ
    # The rope tile's one-hots are not the value dims' (a kernel that loaded dims 0-63 there would fail `rope`).
    rope = probe_script.build("rope", s_q=1, h_q=4, h_kv=1).k_cache
    page = rope[probe_script.build("rope", s_q=1, h_q=4, h_kv=1).block_table[0, 0], :, 0]
    assert not np.array_equal(page[:, 512:], page[:, :64])


def test_diagnosis_of_right_outputs_is_empty(tokens_probe):
    probe, out, lse = tokens_probe
    assert probe_script.diagnose(probe, out.copy(), lse.copy(), out, lse) == []


def test_diagnosis_names_swapped_query_rows(tokens_probe):
    """Q's rows mixed up (or P's columns): row (0, 1) shows row (0, 2)'s token."""
    probe, want_out, want_lse = tokens_probe
    out = want_out.copy()
    out[:, 0, [1, 2]] = out[:, 0, [2, 1]]
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    assert any("s 0 head 1:" in line and "that is query row (s 0, head 2)'s token" in line for line in findings), \
        findings


def test_diagnosis_names_tokens_off_within_a_page(tokens_probe):
    """S's or P's token index off by 8 (the other half of a warp's 16 tokens)."""
    probe, want_out, want_lse = tokens_probe
    out = want_out.copy()
    out[..., :probe_script.HEAD_MARKER_DIM] = 0.0
    for i, length in enumerate(probe.seqlens):
        for s in range(2):
            for h in range(8):
                tau = probe_script.target_token("tokens", s * 8 + h, int(length), 2, 8)
                out[i, s, h, tau ^ 8] = 1.0
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    assert findings[0].startswith("out: ")
    tau = probe_script.target_token("tokens", 0, int(probe.seqlens[0]), 2, 8)
    assert f"seq 0 s 0 head 0: peaks 1.000 at dim {tau ^ 8} " in findings[1], findings
    assert f"wants token {tau % 64} of page {tau // 64}" in findings[1]


def test_diagnosis_of_rows_without_a_peak_or_with_a_wrong_weight(tokens_probe):
    """A row spread over many tokens, and a row on its own token with half the weight (a sum or merge fault)."""
    probe, want_out, want_lse = tokens_probe
    out = want_out.copy()
    out[0, 0, 0, :probe_script.HEAD_MARKER_DIM] = 1 / 300
    out[0, 0, 1] *= 0.5
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    assert any(line.startswith("seq 0 s 0 head 0: no single token") for line in findings), findings
    tau = probe_script.target_token("tokens", 1, int(probe.seqlens[0]), 2, 8)
    assert any(line.startswith(f"seq 0 s 0 head 1: its own token {tau}, with weight 0.500") for line in findings)
    assert any(line.startswith("seq 0 s 0 head 1: dim 511 holds 0.500: weights that do not sum to 1") for line in
               findings), findings


def test_diagnosis_names_the_wrong_kv_head():
    probe = probe_script.build("tokens", s_q=1, h_q=4, h_kv=2)
    want_out, want_lse = probe_script.expected(probe)
    out = want_out.copy()
    out[1, 0, 3, probe_script.HEAD_MARKER_DIM] = 1.0  # head 3 is KV head 1's: marker 2
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    assert any("seq 1 s 0 head 3: dim 511 holds 1.000: the keys of KV head 0, wants KV head 1" in line
               for line in findings), findings


def test_diagnosis_counts_values_that_are_no_single_dim():
    """Two thirds of dim d and a third of d ^ 8 is no whole code: it is counted as a mix, not as an offset."""
    probe = probe_script.build("dim_low", s_q=1, h_q=4, h_kv=1)
    want_out, want_lse = probe_script.expected(probe)
    out = (2 * want_out + want_out[..., np.arange(512) ^ 8]) / 3
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    assert any(line.startswith(f"{out.size} wrong values are not whole codes") for line in findings), findings
    assert not any(line.startswith("wrong values that are whole codes") for line in findings)


def test_diagnosis_names_permuted_dims_and_bad_lse():
    """The P V operand or the epilogue putting dim d ^ 8 at d: codes off by +-8; an LSE off in one row."""
    probe = probe_script.build("dim_low", s_q=1, h_q=16, h_kv=1)
    want_out, want_lse = probe_script.expected(probe)
    out = want_out[..., np.arange(512) ^ 8]
    lse = want_lse.copy()
    lse[1, 3, 0] += 1.0
    findings = probe_script.diagnose(probe, out, lse, want_out, want_lse)
    assert any("whole codes, off by (dims within a 64-dim tile): +8 x" in line and "-8 x" in line
               for line in findings), findings
    assert any(line.startswith("lse: 1 of") and "(seq 1, head 3, s 0)" in line for line in findings), findings


def test_diagnosis_names_nan(tokens_probe):
    probe, want_out, want_lse = tokens_probe
    out = want_out.copy()
    out[2, 1, 5, 17] = np.nan
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    assert "(1 NaN)" in findings[0] and "seq 2 s 1 head 5: 1 values not finite" in findings[1], findings


def test_main_on_this_machine(capsys):
    """The command line runs here too (the reference), and says so."""
    assert probe_script.main(["--probes", "rope", "--dtypes", "float16", "--h-q", "4"]) == 0
    printed = capsys.readouterr().out
    assert "rope      float16  32 SMs: ok" in printed and printed.rstrip().endswith("all ok")


def test_diagnosis_names_a_causal_mask_off_by_one():
    """One key too many (a row peaks at the first key its query token must not see), or one too few (its own key
    masked, so no key stands out)."""
    probe = probe_script.build("causal", s_q=3, h_q=4, h_kv=1)
    want_out, want_lse = probe_script.expected(probe)
    loose = probe_script.build("causal", s_q=3, h_q=4, h_kv=1)
    loose.causal = False  # every query token sees every key: s 0 and 1 reach their trap
    out, _ = probe_script.expected(loose)
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    tau = probe_script.target_token("causal", 0, int(probe.seqlens[0]), 3, 4)
    assert any(line.startswith(f"seq 0 s 0 head 0: peaks 0.982 at token {tau + 1}, the first key its query token "
                               "must not see: the causal mask lets it through") for line in findings), findings
    tight = probe_script.build("causal", s_q=3, h_q=4, h_kv=1)
    tight.seqlens = tight.seqlens - 1  # the mask one key short: the answer of sequences one token shorter
    out, _ = probe_script.expected(tight)
    findings = probe_script.diagnose(probe, out, want_lse.copy(), want_out, want_lse)
    assert any(line.startswith("seq 0 s 0 head 0: no single token") for line in findings), findings
