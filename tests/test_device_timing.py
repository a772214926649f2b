"""jax_flashmla.device_timing: which HLO instructions a named scope holds, how device events are grouped into
calls, and what a real profiled run gives (None on CPU, one span per call on a GPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.profiler import ProfileData

from jax_flashmla import bench, device_timing

SCOPE = "timed"

HLO = """
%fused_add (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%p, %p), metadata={op_name="jit(run)/while/body/timed/add"}
}
%body (carry: f32[4]) -> f32[4] {
  %decode.0 = (bf16[8], f32[2]) custom-call(%x), custom_call_target="jax_flashmla_mla_decode", metadata={op_name="jit(run)/while/body/timed/mla_decode" stack_frame_id=3}
  ROOT %loop_add_fusion.1 = f32[4]{0} fusion(%y), kind=kLoop, calls=%fused_add, metadata={op_name="jit(run)/while/body/add"}
  %copy.3 = f32[4]{0} copy(%z)
  %untimed.2 = f32[4]{0} fusion(%z), kind=kLoop, calls=%f, metadata={op_name="jit(run)/while/body/timed_not/add"}
}
"""


def test_scoped_instructions_are_those_whose_op_name_runs_through_the_scope():
    assert device_timing.scoped_instructions(HLO, SCOPE) == {"add.1", "decode.0"}


def _event(metadata_id, start_ps, duration_ps, hlo_op):
    return (f"events {{ metadata_id: {metadata_id} offset_ps: {start_ps} duration_ps: {duration_ps} "
            f'stats {{ metadata_id: 99 str_value: "{hlo_op}" }} }}')


KERNEL_NAMES = {1: "kernel", 2: "void jax_flashmla::narrow::decode_kernel<__nv_bfloat16, 16>(DecodeParams)",
                3: "void jax_flashmla::combine_kernel<__nv_bfloat16>(DecodeParams)"}


def _plane(name, lines):
    text = "\n".join(f'lines {{ id: {i} name: "stream {i}" timestamp_ns: 0 {" ".join(events)} }}'
                     for i, events in enumerate(lines))
    names = " ".join(f'event_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }}' for k, v in KERNEL_NAMES.items())
    return (f'planes {{ name: "{name}" {text} {names} '
            'stat_metadata { key: 99 value { id: 99 name: "hlo_op" } } }')


def test_calls_are_maximal_runs_of_scoped_events_over_all_streams():
    ns = 1000  # ps per ns
    stream_a = [
        _event(1, 0, 400 * ns, "decode.0"),  # call 1: split-KV kernel,
        _event(1, 402 * ns, 10 * ns, "decode.0"),  # the combine 2 ns later,
        _event(1, 413 * ns, 25 * ns, "loop_fusion"),  # then the loop's own work ends the call.
        _event(1, 440 * ns, 300 * ns, "decode.0"),  # call 2
    ]
    stream_b = [_event(1, 500 * ns, 900 * ns, "decode.0")]  # overlaps call 2 on another stream: same call
    profile = ProfileData.from_text_proto(
        _plane("/device:GPU:0", [stream_a, stream_b])
        + _plane("/host:CPU", [[_event(1, 0, 5000 * ns, "decode.0")]]))  # host events are not device time
    calls = device_timing.scoped_calls_ns(profile, {"decode.0"})
    assert [span for span, _ in calls] == pytest.approx([412, 960])
    # The tail: no event is named like the split-KV kernel here, so from the end of the longest event to the
    # call's end (the combine and the gap before it; none in call 2, whose longest event ends last).
    assert [tail for _, tail in calls] == pytest.approx([12, 0])


def test_the_tail_runs_from_the_split_kv_kernels_end():
    """A combine launched as the decode's programmatic dependent may start with it and outlast it: the tail is
    measured from the end of the event named like the split-KV kernel, not of the longest one."""
    ns = 1000
    plain = [_event(2, 0, 400 * ns, "decode.0"), _event(3, 403 * ns, 6 * ns, "decode.0"),
             _event(1, 500 * ns, 20 * ns, "loop_fusion")]  # the loop's own work between the two calls
    dependent = [_event(2, 1000 * ns, 400 * ns, "decode.0")], [_event(3, 1002 * ns, 403 * ns, "decode.0")]
    profile = ProfileData.from_text_proto(_plane("/device:GPU:0", [plain + dependent[0], dependent[1]]))
    assert device_timing.scoped_calls_ns(profile, {"decode.0"}) == pytest.approx([(409, 9), (405, 5)])


def _tiny_timed_loop(n):
    def body(_, x):
        with jax.named_scope(SCOPE):
            y = jnp.tanh(x @ x)
        return y + 1

    return jax.jit(lambda x: jax.lax.fori_loop(0, n, body, x)).lower(jnp.ones((64, 64))).compile()


@pytest.mark.skipif(bool(jax.devices()[0].platform == "gpu"), reason="covers the CPU fallback")
def test_without_device_events_there_is_no_profiled_time():
    compiled = _tiny_timed_loop(3)
    assert device_timing.scoped_instructions(compiled.as_text(), SCOPE)  # the scope is in the HLO
    assert device_timing.profile_call_ms(compiled, (jnp.ones((64, 64)),), SCOPE, 3, 2) is None


def test_a_busy_profiler_gives_no_profiled_time_and_a_warning(tmp_path):
    compiled = _tiny_timed_loop(2)
    jax.profiler.start_trace(str(tmp_path))  # as Nsight Compute or a user's own trace would hold it
    try:
        with pytest.warns(UserWarning, match="did not start"):
            assert device_timing.profile_call_ms(compiled, (jnp.ones((64, 64)),), SCOPE, 2, 1) is None
    finally:
        jax.profiler.stop_trace()


@pytest.mark.gpu
def test_profiled_decode_gives_one_positive_span_per_call_within_the_loop_time():
    config = bench.RowConfig(8, 1024, 2, 128, 1, False, "bfloat16")
    lengths = bench.sample_lengths(config, False, 0)
    q, k_cache, table, seqlens = bench.make_inputs(jax.random.key(1), lengths, config)
    metadata = bench.get_mla_metadata(seqlens, config.s_q * config.h_q, 1)
    step = functools.partial(bench._decode_with_metadata, causal=False, layer=None)
    ms, loop_ms, timing, tail_ms = bench.decode_ms(step, bench.repeat_decode(step, 1),
                                                   (q, k_cache, table, seqlens, *metadata), iters=10, repeats=3,
                                                   warmup=1)
    assert timing == "profiler"
    assert 0 <= tail_ms < ms  # the combine after the split-KV kernel
    spans = device_timing.profile_call_ms(bench.repeat_decode(step, 10).lower(q, k_cache, table, seqlens,
                                                                              *metadata).compile(),
                                          (q, k_cache, table, seqlens, *metadata), bench.TIMED_SCOPE, 10, 2)
    assert spans is not None and len(spans) == 20 and min(spans) > 0
    # The loop's wall time per decode also holds the loop's own work, so it cannot be much below the decode.
    assert 0 < ms < 1.5 * loop_ms and np.isfinite(ms)


def test_spans_far_below_the_loop_time_fall_back_to_the_loop(monkeypatch):
    """A profile whose runs hold a small part of the loop's time per decode has missed kernels (the XLA sparse
    path's inner loops on an H200: runs 23-290x shorter than the loop): the wall clock is reported instead."""
    step = functools.partial(bench._decode_with_metadata, causal=False, layer=None)
    config = bench.RowConfig(2, 128, 1, 16, 1, False, "bfloat16")
    q, k_cache, table, seqlens = bench.make_inputs(jax.random.key(1), bench.sample_lengths(config, False, 0), config)
    args = (q, k_cache, table, seqlens, *bench.get_mla_metadata(seqlens, config.h_q, 1))
    monkeypatch.setattr(bench, "loop_ms", lambda *a, **k: 2.0)
    for span, timing in [(0.19, "wall-loop"), (0.21, "profiler")]:
        monkeypatch.setattr(bench, "profile_calls_ms", lambda *a, span=span: [(span, 0.01)] * 4)
        ms, loop_ms, got_timing, tail = bench.decode_ms(step, bench.repeat_decode(step, 1), args, iters=2, repeats=2,
                                                        warmup=0)
        assert (got_timing, loop_ms) == (timing, 2.0)
        assert (ms, tail) == ((2.0, None) if timing == "wall-loop" else (span, 0.01))
