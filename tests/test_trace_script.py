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


def test_tile_events_trace_every_refill_of_the_pair_loop_and_every_s_tile_wait(trace_script):
    kernel = (ROOT / trace_script.KERNEL).read_text()
    traced = trace_script.instrument(kernel, "tile-events")
    refills = kernel.count("refill_tiles(p, kv_map, s, layer, hint, ")
    assert refills >= 4
    # Every refill call goes through the stamping wrapper; the one plain call left is inside the wrapper.
    assert traced.count("traced_refill_tiles(wg.tile_row, p, kv_map, s, layer, hint, ") == refills
    assert traced.count("refill_tiles(p, kv_map, s, layer, hint, ") == 1
    assert traced.count("wait_barrier(s.full[kStage][") == 2 and traced.count("tile_row[(kStage * kNumChunks + ") == 4
    # Records are per pair: set at the pair's top, cleared before the epilogue, so a chunk's first S is none's.
    loop = traced.index("    for (int i = 0; i < n_tiles; i += 2) {")
    loop_top = traced.index("      const bool has_k1 = i + 1 < n_tiles;")
    epilogue = traced.index("    // Epilogue: both halves share the row sums")
    assert loop < traced.index("      wg.tile_row = nullptr;\n", loop) < loop_top
    assert loop_top < traced.rindex("    wg.tile_row = nullptr;\n", 0, epilogue) < epilogue


def test_tile_summary_takes_medians_per_stage_and_tile(trace_script):
    def line(pair, cycles, stage, tiles):
        fields = " ".join(f"{t}:{i}/{b}/{e}" for t, (i, b, e) in enumerate(tiles))
        return f"TRACE tiles part 0 pair {pair} (pages 0-1 of 64, {cycles} cycles) stage {stage}: {fields}"

    rest = [(-1, -1, -1)] * 8
    lines = [
        "TRACE launch 3: from the first CTA's start to the last one's end, 100 us",
        line(6, 6000, 0, [(1000, 4000, 4500)] + rest),  # waited 500: latency 3500
        line(6, 6000, 1, rest + [(2000, 3000, 3030)]),  # found landed: no latency
        line(7, 6200, 0, [(1100, 4100, 4200)] + rest),  # waited 100: not more than WAITED
        line(7, 6200, 1, rest + [(2100, 3100, 3600)]),  # waited 500: latency 1500
        line(8, -1, 0, [(1200, 4000, 5300)] + rest),    # waited 1300: latency 4100
    ]
    summary = trace_script.summarize_tile_events(lines).splitlines()
    assert summary[0].startswith("2 pairs with a length: median 6100 cycles")
    rows = {tuple(int(v) for v in row.split()[:2]): row.split() for row in summary[2:]}
    assert set(rows) == {(0, t) for t in range(9)} | {(1, t) for t in range(9)}
    stage0 = rows[(0, 0)]  # stage tile pairs issued begun ended wait waited "of" count latency
    assert stage0[2:8] == ["3", "1100", "4000", "4500", "500", "2"] and stage0[9:] == ["3", "3800"]
    assert rows[(1, 8)][7:] == ["1", "of", "2", "1500"]
    assert rows[(0, 1)][3:] == ["-", "-", "-", "-", "0", "of", "0", "-"]
    assert trace_script.summarize_tile_events(["nothing"]).startswith("no tile records")


def test_unknown_mode_is_refused(trace_script):
    with pytest.raises(ValueError, match="pair_waits"):
        trace_script.instrument((ROOT / trace_script.KERNEL).read_text(), "pair_waits")


@pytest.mark.parametrize("mode", ["timeline", "pair-waits", "pair-events", "tile-events"])
def test_records_leave_the_decode_kernel_only_through_the_printing_kernel(trace_script, mode):
    traced = trace_script.instrument((ROOT / trace_script.KERNEL).read_text(), mode)
    # printf in the decode kernel would make ptxas serialize its wgmma: it lives in trace_print_kernel only.
    printing = traced.index("static __global__ void trace_print_kernel()")
    assert traced.count("printf(") >= 1 and traced.index("printf(") > printing
    assert traced.count("atomicAdd(&g_trace_launches, 1)") == 1 and traced.count("atomicAdd(&g_trace_ready, 1)") == 1
    launch = trace_script.instrument_launch((ROOT / trace_script.LAUNCH).read_text())
    assert launch.count("seesaw::trace_print_kernel<<<1, 1, 0, stream>>>();") == 1
