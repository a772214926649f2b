"""Ranks a kernel's SASS instructions by Nsight Compute's warp-stall samples.

Usage: python3 scripts/stall_hotspots.py NCU_SOURCE.csv [--top N]
       python3 scripts/stall_hotspots.py --mix NCU_SOURCE.csv [NCU_SOURCE.csv ...] [--top N]
The CSV is `ncu --import REP --page source --print-source sass --csv` (scripts/profile_decode.sh writes it).
--mix: instead, each kernel's totals per opcode (the mnemonic before its first dot): the instructions executed and
the stall samples, with the stall reasons over the whole kernel. Two kernels doing the same work (the same HGMMA
count) compare by it: what the extra instructions are, and where the samples go (NOTES.md, version 2.24).
Samples are taken per warp, so an idle warpgroup (one waiting on an mbarrier) collects as many as a busy one:
read the waits (SYNCS.PHASECHK.TRYWAIT loops, WARPGROUP.DEPBAR) as time a role spends blocked, and compare
the roles' regions of the code rather than single lines.
"""
import argparse
import collections
import csv


def read_sass_csv(path):
    """The per-instruction table of an ncu source-page CSV: ({column name: index}, rows)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header_at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    header = rows[header_at]
    return {name: i for i, name in enumerate(header)}, rows[header_at + 1:]


def opcode(source):
    """The opcode of a SASS line with its modifiers, without its predicate: "@!P1 HGMMA.64x64x16.F32 ..." ->
    "HGMMA.64x64x16.F32"."""
    words = source.strip().split()
    return words[1] if words[0].startswith("@") else words[0]


def mnemonic(source):
    """The opcode without its modifiers: "@!P1 HGMMA.64x64x16.F32 ..." -> "HGMMA"."""
    return opcode(source).split(".")[0] if source.strip() else "?"


def opcode_mix(path, top):
    """Prints one kernel's instructions executed and stall samples per opcode, and its stall reasons."""
    col, body = read_sass_csv(path)
    reasons = [n for n in col if n.startswith("stall_") and "(Not Issued)" not in n]
    executed, samples = collections.Counter(), collections.Counter()
    why = collections.defaultdict(collections.Counter)
    for r in body:
        op = mnemonic(r[col["Source"]])
        executed[op] += int(r[col["Instructions Executed"]] or 0)
        samples[op] += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        for reason in reasons:
            why[op][reason[len("stall_"):]] += int(r[col[reason]] or 0)
    total_executed, total_samples = sum(executed.values()) or 1, sum(samples.values()) or 1
    by_reason = collections.Counter()
    for counts in why.values():
        by_reason.update(counts)
    reason_total = sum(by_reason.values()) or 1
    print(f"== {path}: {sum(executed.values())} warp instructions executed, {sum(samples.values())} stall samples")
    print("   stall reasons: " + ", ".join(f"{w} {n / reason_total:.1%}" for w, n in by_reason.most_common() if n))
    print(f"{'opcode':>12} {'executed':>11} {'share':>6} {'samples':>6}  top reasons")
    for op, n in executed.most_common(top):
        reasons_here = ", ".join(f"{w} {c / reason_total:.1%}" for w, c in why[op].most_common(3) if c)
        print(f"{op:>12} {n:>11} {n / total_executed:>6.1%} {samples[op] / total_samples:>6.1%}  {reasons_here}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_path", nargs="+")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--mix", action="store_true", help="totals per opcode, for each CSV")
    args = parser.parse_args()
    if args.mix:
        for path in args.csv_path:
            opcode_mix(path, args.top)
        return
    if len(args.csv_path) != 1:
        parser.error("one CSV, unless --mix")
    col, body = read_sass_csv(args.csv_path[0])
    samples = lambda r: int(r[col["Warp Stall Sampling (All Samples)"]] or 0)  # noqa: E731
    total = sum(samples(r) for r in body) or 1
    print(f"{len(body)} instructions, {total} stall samples")
    print(f"{'address':>8} {'samples':>8} {'share':>6} {'executed':>10}  instruction")
    for r in sorted(body, key=samples, reverse=True)[:args.top]:
        print(f"{r[col['Address']][-6:]:>8} {samples(r):>8} {samples(r) / total:>6.1%} "
              f"{r[col['Instructions Executed']]:>10}  {r[col['Source']].strip()[:90]}")


if __name__ == "__main__":
    main()
