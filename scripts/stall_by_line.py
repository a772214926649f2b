"""Sums a kernel's Nsight Compute warp-stall samples per source line of one function, with the stall reasons.

Usage: python3 scripts/stall_by_line.py NCU_SASS.csv LISTING --kernel NAME --file FILE --lines FIRST-LAST
  NCU_SASS.csv  `ncu --import REP --page source --print-source sass --csv` (scripts/profile_decode.sh writes it)
  LISTING       `nvdisasm -gi -c KERNELS.cubin` of the same build: ncu's SASS carries no inlining, so each
                instruction is mapped to its line through this listing (the script checks that every opcode
                matches). Build the cubin here with the flags of CMakeLists.txt, e.g.
                nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr --use_fast_math
                     -lineinfo -Isrc -I<cutlass include> -cubin -o k.cubin src/kernels/decode_bf16.cu
                Where the CUDA toolkit has no nvdisasm (the CI machine), the `nvidia-cuda-nvdisasm` wheel has
                one (nvidia/cu13/bin/nvdisasm): 13.2's lists nvcc 13.0's sm_90a cubins, and this tree's local
                build gave the same SASS as the GPU machine's (NOTES.md, version 2.24).
  --kernel      a substring of the kernel's mangled name (e.g. seesaw13decode_kernelI13__nv_bfloat16)
  --file/--lines  the function to attribute to: an instruction counts for the innermost line of FILE in
                [FIRST, LAST] among its inlining chain (a helper called from that function counts for the call).
Unlike scripts/stall_hotspots.py (one row per instruction), this says which statement of a warpgroup's loop
the samples belong to, e.g. how much of a GEMM issue is back-pressure (HGMMA) and how much a TMA wait (BRA).
  --executed    rank the lines by the warp instructions they executed (summed over their instructions), with
                the opcodes that make them up: where one build issues more than another for the same work.
  --fetch       instead, where the warps of the function wait for instructions (`no_instructions`): its hot code
                (instructions executed at least P/2 times, P the count most of its instructions ran: once per
                loop trip and warp) and the instructions with the most such samples, each with the run of code
                just before it that ran less than half as often. The hot path jumps over such a run, so the
                instruction is a branch target, and a taken branch to a line not in the instruction cache stalls
                the warp (benchmarks/NOTES.md, version 2.11).
"""
import argparse
import collections
import os
import re

from stall_hotspots import mnemonic, opcode, read_sass_csv


def parse_listing(path, kernel):
    """Offset -> (opcode, [(file, line), ...] innermost first) for the kernel's function in an nvdisasm listing."""
    text = open(path).read().split("\n")
    start = next(i for i, line in enumerate(text) if line.startswith(".text.") and kernel in line and line.endswith(":"))
    code, pending, last = {}, [], []
    for line in text[start + 1:]:
        if line.startswith(".text.") or line.startswith("//-----"):
            break
        loc = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if loc:
            pending.append((loc.group(1).rsplit("/", 1)[-1], int(loc.group(2))))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?(\S+)", line)
        if ins:
            last = pending or last
            code[int(ins.group(1), 16)] = (ins.group(3).rstrip(";"), last)
            pending = []
    return code


def attribute(code, col, body, file, first, last):
    """The profile's rows by address: (offset, row, the innermost line of FILE in [first, last] or None). Warns if
    the listing's opcodes are not the profile's."""
    base = min(int(r[col["Address"]], 16) for r in body)
    rows, mismatches = [], 0
    for r in body:
        offset = int(r[col["Address"]], 16) - base
        op, chain = code.get(offset, ("?", []))
        mismatches += op != opcode(r[col["Source"]])
        inside = [line for (name, line) in chain if name == file and first <= line <= last]
        rows.append((offset, r, inside[0] if inside else None))
    if mismatches:
        print(f"WARNING: {mismatches} of {len(body)} opcodes differ: the listing is not the profiled build")
    return sorted(rows, key=lambda row: row[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_path")
    parser.add_argument("listing")
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--lines", required=True, help="FIRST-LAST")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--fetch", action="store_true", help="the instruction-fetch stalls and the hot code")
    parser.add_argument("--executed", action="store_true", help="rank lines by instructions executed")
    args = parser.parse_args()
    first, last = (int(x) for x in args.lines.split("-"))
    code = parse_listing(args.listing, args.kernel)

    col, body = read_sass_csv(args.csv_path)
    rows = attribute(code, col, body, args.file, first, last)
    if args.fetch:
        return fetch_report(rows, col, args.file, first, last, args.top)
    reasons = [n for n in col if n.startswith("stall_") and "(Not Issued)" not in n]

    samples, ops, why, executed = (collections.Counter(), collections.defaultdict(collections.Counter),
                                   collections.defaultdict(collections.Counter), collections.Counter())
    issued, issued_ops = collections.Counter(), collections.defaultdict(collections.Counter)
    for _, r, line in rows:
        key = "elsewhere" if line is None else line
        n = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        runs = int(r[col["Instructions Executed"]] or 0)
        samples[key] += n
        ops[key][opcode(r[col["Source"]])] += n
        executed[key] = max(executed[key], runs)
        issued[key] += runs
        issued_ops[key][mnemonic(r[col["Source"]])] += runs
        for reason in reasons:
            why[key][reason[len("stall_"):]] += int(r[col[reason]] or 0)
    total = sum(samples.values()) or 1
    source = open(next(p for p in [args.file, f"src/kernels/{args.file}"] if os.path.exists(p))).read().split("\n")
    if args.executed:
        all_issued = sum(issued.values()) or 1
        print(f"{len(body)} instructions, {sum(issued.values())} warp instructions executed")
        print(f"{'line':>9} {'executed':>11} {'share':>6}  statement / opcodes by instructions executed")
        for key, n in issued.most_common(args.top):
            text = source[key - 1].strip()[:70] if isinstance(key, int) and key <= len(source) else ""
            top_ops = ", ".join(f"{o} {c}" for o, c in issued_ops[key].most_common(5))
            print(f"{key:>9} {n:>11} {n / all_issued:>6.1%}  {text}\n{'':>29}{top_ops}")
        return
    print(f"{len(body)} instructions, {total} stall samples")
    print(f"{'line':>9} {'samples':>8} {'share':>6} {'executed':>9}  statement / top opcodes / top reasons")
    for key, n in samples.most_common(args.top):
        text = source[key - 1].strip()[:70] if isinstance(key, int) and key <= len(source) else ""
        top_ops = ", ".join(f"{o} {c}" for o, c in ops[key].most_common(3))
        top_why = ", ".join(f"{w} {c}" for w, c in why[key].most_common(3))
        print(f"{key:>9} {n:>8} {n / total:>6.1%} {executed[key]:>9}  {text}\n{'':>36}{top_ops}\n{'':>36}{top_why}")


def fetch_report(attributed, col, file, first, last, top):
    """Prints the function's hot code and its largest `no_instructions` stalls, each with the run it jumped over."""
    # (offset, source, executed, no-instruction samples, line in the function or None), by address
    rows = [(offset, r[col["Source"]].strip(), int(r[col["Instructions Executed"]] or 0),
             int(r[col["stall_no_inst"]] or 0), line) for offset, r, line in attributed]
    counts = collections.Counter(e for *_, e, _, line in rows if line is not None and e > 0)
    if not counts:
        print(f"no executed instruction of {file}:{first}-{last}")
        return
    trips = counts.most_common(1)[0][0]
    mine = [r for r in rows if r[4] is not None]
    hot = sum(1 for r in mine if r[2] >= trips / 2)
    warm = sum(1 for r in mine if trips / 8 <= r[2] < trips / 2)
    total = sum(r[3] for r in rows) or 1
    print(f"P = {trips} (the most common execution count of the function's instructions)")
    print(f"hot code: {hot} instructions ({hot * 16 / 1024:.1f} KB) executed >= P/2 times; {warm} more "
          f"({warm * 16 / 1024:.1f} KB) P/8..P/2 times; of {len(mine)} attributed to {file}:{first}-{last}")
    print(f"no_instructions samples: {total} in the kernel, {sum(r[3] for r in mine)} in the function")
    print(f"{'offset':>8} {'samples':>8} {'share':>6} {'exec/P':>6} {'jumped over':>11}  line  instruction")
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i][3])[:top]
    for i in sorted(ranked):
        offset, source, executed, n, line = rows[i]
        skipped = 0  # the run just before that ran less than half as often: what a taken branch jumped over
        while i - skipped - 1 >= 0 and rows[i - skipped - 1][2] < executed / 2:
            skipped += 1
        print(f"{offset:>#8x} {n:>8} {n / total:>6.1%} {executed / trips:>6.2f} {skipped:>11}  {str(line):>4}  "
              f"{source[:60]}")


if __name__ == "__main__":
    main()
