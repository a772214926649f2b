"""The builds scripts/compare_builds.sh timed, side by side: per bench row, each build's mean kernel time over its
rounds (the bench's kernel_ms, the profiler's span of each decode; not loop_ms) and its change against the first
build, then the spread of each build's rounds, to judge that change by.

Usage: python3 scripts/summarize_builds.py LOG_DIR NAME [NAME ...]
  NAME: the builds, the first one the reference. Reads LOG_DIR/bench_NAME/results.json (the first round) and
  LOG_DIR/benchR_NAME/results.json (round R = 2, 3, ...), as compare_builds.sh writes them.
"""
import json
import pathlib
import re
import statistics
import sys


def row_key(record: dict) -> tuple:
    return (record["batch"], record["s_k"], record["s_q"], record["h_q"], bool(record["causal"]))


def row_label(key: tuple) -> str:
    batch, s_k, s_q, h_q, causal = key
    return f"b {batch} s_k {s_k} s_q {s_q} h_q {h_q}{' causal' if causal else ''}"


def kernel_times(log_dir: pathlib.Path, name: str) -> dict[tuple, list[float]]:
    """Each bench row's kernel_ms over the build's rounds, in round order."""
    times: dict[tuple, list[float]] = {}
    # Exactly bench_NAME and benchR_NAME: no other build's folders, whatever the names, and a round that failed
    # for this build leaves out that round only.
    later = {}
    for folder in log_dir.iterdir():
        if match := re.fullmatch(rf"bench(\d+)_{re.escape(name)}", folder.name):
            later[int(match.group(1))] = folder
    rounds = [log_dir / f"bench_{name}"] + [later[r] for r in sorted(later)]
    for folder in rounds:
        path = folder / "results.json"
        if not path.exists():
            continue
        for record in json.loads(path.read_text()):
            if record.get("kernel_ms") is not None:
                times.setdefault(row_key(record), []).append(float(record["kernel_ms"]))
    return times


def summarize(log_dir: pathlib.Path, names: list[str]) -> str:
    builds = {name: kernel_times(log_dir, name) for name in names}
    keys = sorted({key for times in builds.values() for key in times})
    if not keys:
        return f"no bench results under {log_dir} for {', '.join(names)}"
    reference = names[0]
    width = max(len(row_label(key)) for key in keys)
    mean_cols = [f"{name} ms (rounds)" if name == reference else f"{name} ms, vs {reference}" for name in names]
    lines = [f"kernel ms, mean over each build's rounds; change against {reference}",
             "  ".join([" " * width] + [c.rjust(24) for c in mean_cols])]
    for key in keys:
        cells = [row_label(key).ljust(width)]
        base = builds[reference].get(key)
        for name in names:
            times = builds[name].get(key)
            if not times:
                cells.append("-".rjust(24))
                continue
            mean = statistics.fmean(times)
            change = ""
            if name != reference and base:
                change = f" {100 * (mean / statistics.fmean(base) - 1):+.1f}%"
            cells.append(f"{mean:.4f}{change} ({len(times)})".rjust(24))
        lines.append("  ".join(cells))
    lines.append("spread of each build's rounds, (max - min) / mean")
    for key in keys:
        cells = [row_label(key).ljust(width)]
        for name in names:
            times = builds[name].get(key)
            spread = f"{100 * (max(times) - min(times)) / statistics.fmean(times):.1f}%" if times else "-"
            cells.append(spread.rjust(24))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(summarize(pathlib.Path(sys.argv[1]), sys.argv[2:]))


if __name__ == "__main__":
    main()
