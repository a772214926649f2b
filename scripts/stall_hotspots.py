"""Ranks a kernel's SASS instructions by Nsight Compute's warp-stall samples.

Usage: python3 scripts/stall_hotspots.py NCU_SOURCE.csv [--top N]
The CSV is `ncu --import REP --page source --print-source sass --csv` (scripts/profile_decode.sh writes it).
Samples are taken per warp, so an idle warpgroup (one waiting on an mbarrier) collects as many as a busy one:
read the waits (SYNCS.PHASECHK.TRYWAIT loops, WARPGROUP.DEPBAR) as time a role spends blocked, and compare
the roles' regions of the code rather than single lines.
"""
import argparse
import csv


def read_sass_csv(path):
    """The per-instruction table of an ncu source-page CSV: ({column name: index}, rows)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header_at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    header = rows[header_at]
    return {name: i for i, name in enumerate(header)}, rows[header_at + 1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_path")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    col, body = read_sass_csv(args.csv_path)
    samples = lambda r: int(r[col["Warp Stall Sampling (All Samples)"]] or 0)  # noqa: E731
    total = sum(samples(r) for r in body) or 1
    print(f"{len(body)} instructions, {total} stall samples")
    print(f"{'address':>8} {'samples':>8} {'share':>6} {'executed':>10}  instruction")
    for r in sorted(body, key=samples, reverse=True)[:args.top]:
        print(f"{r[col['Address']][-6:]:>8} {samples(r):>8} {samples(r) / total:>6.1%} "
              f"{r[col['Instructions Executed']]:>10}  {r[col['Source']].strip()[:90]}")


if __name__ == "__main__":
    main()
