"""scripts/trace_chunk_timeline.py still finds its anchors in the seesaw kernel and its launch, in every mode,
so an edit of the kernel that would break the tracing tool fails here, on CPU, rather than on the GPU machine.
(tests/test_kernel_codegen.py compiles the traced copies.)"""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_stamp_lands_once_in_the_kernel(trace_script):
    traced = trace_script.instrument((ROOT / trace_script.KERNEL).read_text())
    for k in range(7):
        assert traced.count(f"    STAMP({k})\n") == 1
    # The stamps follow the chunk's order: loop top, loads issued, Q landed, first S, pairs, sums, epilogue.
    positions = [traced.index(f"    STAMP({k})\n") for k in range(7)]
    assert positions == sorted(positions)


def test_pair_waits_wrap_every_wait_of_the_pair_loop(trace_script):
    kernel = (ROOT / trace_script.KERNEL).read_text()
    traced = trace_script.instrument(kernel, "pair-waits")
    assert traced.count("TRACED_ACQUIRE(s.") == 4 and traced.count("s_wait += clock64() - t0;") == 2
    loop = traced[traced.index("    for (int i = 0; i < n_tiles; i += 2) {"):traced.index("pair_cycles += clock64()")]
    assert "warpgroup_wait<" not in loop and loop.count("TRACED_WAIT(") == kernel[
        kernel.index("    for (int i = 0; i < n_tiles; i += 2) {"):kernel.index("    // Epilogue: both halves")
    ].count("warpgroup_wait<")


def test_pair_events_land_once_each_in_program_order(trace_script):
    traced = trace_script.instrument((ROOT / trace_script.KERNEL).read_text(), "pair-events")
    a_begin = traced.index("      if constexpr (kIsA) {")
    b_begin = traced.index("      } else {\n        // m1 = max(m0")
    end = traced.index("      ++pairs_done;\n")
    assert traced.count("      EVENT(0)\n") == 1
    for role, (begin, stop) in {"A": (a_begin, b_begin), "B": (b_begin, end)}.items():
        body = traced[begin:stop]
        n = len(trace_script.PAIR_EVENTS[role])
        assert len(trace_script.PAIR_EVENT_NAMES[role]) == n + 1
        positions = [body.index(f"        EVENT({k})\n") for k in range(1, n + 1)]
        assert positions == sorted(positions) and all(body.count(f"EVENT({k})") == 1 for k in range(1, n + 1))


def test_unknown_mode_is_refused(trace_script):
    with pytest.raises(ValueError, match="pair_waits"):
        trace_script.instrument((ROOT / trace_script.KERNEL).read_text(), "pair_waits")


@pytest.mark.parametrize("mode", ["timeline", "pair-waits", "pair-events"])
def test_records_leave_the_decode_kernel_only_through_the_printing_kernel(trace_script, mode):
    traced = trace_script.instrument((ROOT / trace_script.KERNEL).read_text(), mode)
    # printf in the decode kernel would make ptxas serialize its wgmma: it lives in trace_print_kernel only.
    printing = traced.index("static __global__ void trace_print_kernel()")
    assert traced.count("printf(") >= 1 and traced.index("printf(") > printing
    assert traced.count("atomicAdd(&g_trace_launches, 1)") == 1 and traced.count("atomicAdd(&g_trace_ready, 1)") == 1
    launch = trace_script.instrument_launch((ROOT / trace_script.LAUNCH).read_text())
    assert launch.count("seesaw::trace_print_kernel<<<1, 1, 0, stream>>>();") == 1
