"""scripts/trace_chunk_timeline.py still finds its anchors in the seesaw kernel, so an edit of the kernel that
would break the timeline tool fails here, on CPU, rather than on the GPU machine."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("trace_chunk_timeline", ROOT / "scripts" / "trace_chunk_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_stamp_lands_once_in_the_kernel():
    script = load_script()
    traced = script.instrument((ROOT / script.KERNEL).read_text())
    for k in range(7):
        assert traced.count(f"    STAMP({k})\n") == 1
    assert traced.count("printf(\"TRACE") == 1 and traced.count("atomicAdd(&g_trace_launches, 1)") == 1
    # The stamps follow the chunk's order: loop top, loads issued, Q landed, first S, pairs, sums, epilogue.
    positions = [traced.index(f"    STAMP({k})\n") for k in range(7)]
    assert positions == sorted(positions)
