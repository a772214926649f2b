"""Device time of each call of a scoped computation inside a jitted loop, read from JAX's profiler.

The bench runs a decode n times in a `fori_loop`, the decode under `jax.named_scope(scope)`. A wall clock
around the loop also counts the loop's own work between decodes (on an H100 a full-size copy of q each
iteration, about 25 us, 5% of a compute-bound row). Here the loop runs under the profiler instead (CUPTI on
GPUs); each device event carries the HLO instruction that launched it (its `hlo_op` stat), and the compiled
HLO's op_name metadata says which instructions lie in the scope. One decode is a maximal run of in-scope
events in start order, and its time is that run's span, first start to last end: the split-KV kernel, the
gap before the combine and the combine, what CUDA events around the call would measure. Its tail is the time
from the end of its split-KV kernel (the last event named like decode_kernel, else the longest event) to the
run's end: what the combine adds, its launch gap included (less where it overlaps the decode, launched as its
programmatic dependent; such a combine may start with the decode and outlast it, so the longest event alone
would not do).

Without device events (on CPU) there is nothing to read: `profile_call_ms` returns None and the caller keeps
its wall-clock time.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import jax
from jax.profiler import ProfileData

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', re.MULTILINE)


def scoped_instructions(hlo_text: str, scope: str) -> set[str]:
    """Names of the instructions of a compiled HLO module whose op_name runs through named scope `scope`."""
    return {name for name, op_name in _INSTRUCTION.findall(hlo_text) if scope in op_name.split("/")}


def scoped_calls_ns(profile: ProfileData, instructions: set[str],
                    anchor: str = "decode_kernel") -> list[tuple[float, float]]:
    """(span, tail) in ns of each maximal run of device events launched by `instructions`, per GPU, in start
    order over all of that GPU's streams; any other device event ends a run. The tail runs from the end of the
    run's last-ending event whose name holds `anchor` (the split-KV kernel), or where none does, of its longest
    event (the first of equals), to the run's end."""
    calls = []

    def close(run):
        first_start, last_end, _, longest_end, anchor_end = run
        calls.append((last_end - first_start, last_end - (longest_end if anchor_end is None else anchor_end)))

    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU:"):
            continue
        events = sorted((event.start_ns, event.start_ns + event.duration_ns,
                         dict(event.stats).get("hlo_op") in instructions, anchor in event.name)
                        for line in plane.lines for event in line.events)
        run = None  # [first start, last end, longest duration, its end, last anchor end] of the current run
        for start, end, in_scope, is_anchor in events:
            if in_scope:
                if run is None:
                    run = [start, end, end - start, end, None]
                else:
                    run[1] = max(run[1], end)
                    if end - start > run[2]:
                        run[2:4] = [end - start, end]
                if is_anchor:
                    run[4] = end if run[4] is None else max(run[4], end)
            elif run is not None:
                close(run)
                run = None
        if run is not None:
            close(run)
    return calls


def profile_call_ms(compiled, args, scope: str, calls_per_run: int, runs: int) -> list[float] | None:
    """Per-call ms of the `scope` computation: the spans of profile_calls_ms."""
    calls = profile_calls_ms(compiled, args, scope, calls_per_run, runs)
    return None if calls is None else [span for span, _ in calls]


def profile_calls_ms(compiled, args, scope: str, calls_per_run: int, runs: int) -> list[tuple[float, float]] | None:
    """(span, tail) ms of each call of the `scope` computation (scoped_calls_ns), from `runs` profiled runs of
    `compiled` (a `jax.stages.Compiled` that calls it `calls_per_run` times) on `args`; None when the profiler
    cannot start (with a warning), when the trace holds no GPU events, or when their runs do not number
    runs * calls_per_run (the scope's kernels interleaved with others, so that calls cannot be told apart)."""
    instructions = scoped_instructions(compiled.as_text(), scope)
    if not instructions:
        return None
    with tempfile.TemporaryDirectory() as log_dir:
        try:
            jax.profiler.start_trace(log_dir)
        except Exception as err:  # another profiler holds the device (Nsight Compute, a trace in progress)
            warnings.warn(f"JAX's profiler did not start ({err}); no per-call device times", stacklevel=2)
            return None
        try:
            for _ in range(runs):
                jax.block_until_ready(compiled(*args))
        finally:
            jax.profiler.stop_trace()
        traces = sorted(Path(log_dir).glob("plugins/profile/*/*.xplane.pb"))
        if not traces:
            return None
        calls = scoped_calls_ns(ProfileData.from_file(str(traces[-1])), instructions)
    if len(calls) != runs * calls_per_run:
        return None
    return [(span / 1e6, tail / 1e6) for span, tail in calls]
