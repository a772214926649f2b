"""The scripts that only run on the lent GPU machine at least parse, so a slip in one fails here, on CPU,
instead of costing a device call."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "scripts").glob("*.sh"))


def test_there_are_scripts():
    assert any(script.name == "gpu_check.sh" for script in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def run_flashmla_ab(*args):
    """scripts/flashmla_ab.py in a subprocess, with the repository importable."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, str(root / "scripts" / "flashmla_ab.py"), *args], capture_output=True,
                          text=True, env=env)


def test_flashmla_ab_script_starts():
    """scripts/flashmla_ab.py imports torch and FlashMLA only once it runs: its --help works anywhere."""
    result = run_flashmla_ab("--help")
    assert result.returncode == 0, result.stderr
    assert "FLASHMLA_DIR" in result.stdout or "flashmla_dir" in result.stdout


def test_flashmla_ab_rejects_bad_pairs():
    """A malformed --pairs stops the script before it builds FlashMLA or touches a GPU."""
    result = run_flashmla_ab(str(pathlib.Path(__file__).resolve().parents[1]), "--pairs", "2x")
    assert result.returncode == 2
    assert "--pairs takes S_QxH_Q" in result.stderr


def test_summarize_builds_means_each_builds_rounds_against_the_first(tmp_path):
    """scripts/summarize_builds.py, which compare_builds.sh ends with: kernel_ms (not loop_ms) averaged over a
    build's rounds, the change against the first build named, the spread, and a dash for a row a build lacks."""

    def bench(folder, rows):
        (tmp_path / folder).mkdir()
        records = [{"batch": 128, "s_k": s_k, "s_q": s_q, "h_q": h_q, "causal": causal, "kernel_ms": ms,
                    "loop_ms": 10 * ms} for s_k, s_q, h_q, causal, ms in rows]
        (tmp_path / folder / "results.json").write_text(json.dumps(records))

    bench("bench_head", [(4096, 1, 16, False, 0.20), (4096, 2, 128, True, 0.50)])
    bench("bench2_head", [(4096, 1, 16, False, 0.22), (4096, 2, 128, True, 0.50)])
    bench("bench_new", [(4096, 1, 16, False, 0.19)])
    bench("bench3_new", [(4096, 1, 16, False, 0.19)])
    bench("bench2_other_new", [(4096, 1, 16, False, 9.0)])  # another build's folder, whose name ends like this one's
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "scripts" / "summarize_builds.py"), str(tmp_path), "head",
                             "new"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    memory = next(line for line in lines if line.startswith("b 128 s_k 4096 s_q 1 h_q 16 "))
    assert memory.split()[-5:] == ["0.2100", "(2)", "0.1900", "-9.5%", "(2)"]
    compute = next(line for line in lines if line.startswith("b 128 s_k 4096 s_q 2 h_q 128 causal"))
    assert compute.split()[-3:] == ["0.5000", "(2)", "-"]
    spread = [line for line in lines if line.startswith("b 128 s_k 4096 s_q 1 h_q 16 ")][1]
    assert spread.split()[-2:] == ["9.5%", "0.0%"]
    empty = subprocess.run([sys.executable, str(root / "scripts" / "summarize_builds.py"), str(tmp_path), "other"],
                           capture_output=True, text=True)
    assert empty.stdout.startswith("no bench results")


def write_made_up_profile(tmp_path):
    """A made-up listing (nvdisasm -gi) and SASS profile (ncu's source page) of one small kernel: lines 10-12 of
    k.cuh, where line 10 branches over line 11 most of the time."""
    listing = tmp_path / "k.sass"
    listing.write_text("\n".join([
        ".text._Z6kernelv:",
        '\t//## File "/src/k.cuh", line 10',
        "        /*0000*/                   MOV R1, R2 ;",
        "        /*0010*/               @P0 BRA `(.L_x_1) ;",
        '\t//## File "/src/k.cuh", line 11',
        "        /*0020*/                   FMUL R3, R3, R4 ;",
        "        /*0030*/                   FMUL.FTZ R5, R5, R4 ;",
        ".L_x_1:",
        '\t//## File "/src/k.cuh", line 12',
        "        /*0040*/                   IADD3 R6, R6, 0x1, RZ ;",
        "        /*0050*/                   EXIT ;",
    ]) + "\n")
    columns = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_no_inst",
               "stall_wait"]
    rows = [("0x7f0000000000", "MOV R1, R2", 3, 100, 1, 2), ("0x7f0000000010", "@P0 BRA 0x7f0000000040", 2, 100, 0, 2),
            ("0x7f0000000020", "FMUL R3, R3, R4", 1, 5, 0, 1), ("0x7f0000000030", "FMUL.FTZ R5, R5, R4", 0, 5, 0, 0),
            ("0x7f0000000040", "IADD3 R6, R6, 0x1, RZ", 60, 100, 50, 10), ("0x7f0000000050", "EXIT", 1, 100, 0, 1)]
    profile = tmp_path / "k.csv"
    profile.write_text('"Kernel Name","kernel()",\n' + ",".join(f'"{c}"' for c in columns) + "\n" +
                       "".join(",".join(f'"{v}"' for v in row) + "\n" for row in rows))
    return profile, listing


def run_profile_script(tmp_path, name, *args):
    root = pathlib.Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=tmp_path)


def test_stall_by_line_fetch_finds_the_branch_target_and_what_it_jumped_over(tmp_path):
    """scripts/stall_by_line.py --fetch on a made-up listing and profile: P is the count most instructions ran,
    the hot code is what ran at least P/2 times, and a no-instruction stall is shown with the run before it that
    ran less than half as often (the cold code the hot path jumped over)."""
    profile, listing = write_made_up_profile(tmp_path)
    result = run_profile_script(tmp_path, "stall_by_line.py", profile, listing, "--kernel", "_Z6kernelv", "--file",
                                "k.cuh", "--lines", "10-12", "--fetch")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert not lines[0].startswith("WARNING"), lines[0]
    assert lines[0].startswith("P = 100 ")
    assert lines[1].startswith("hot code: 4 instructions (0.1 KB) executed >= P/2 times; 0 more")
    assert "51 in the kernel, 51 in the function" in lines[2]
    target = next(line for line in lines if line.split()[0] == "0x40")
    assert target.split()[1:6] == ["50", "98.0%", "1.00", "2", "12"]


def test_stall_by_line_executed_sums_each_lines_instructions(tmp_path):
    """--executed ranks the lines by the warp instructions their SASS executed, summed (line 10: 100 + 100), with
    the opcodes by the same count, modifiers dropped (FMUL and FMUL.FTZ are one)."""
    profile, listing = write_made_up_profile(tmp_path)
    (tmp_path / "k.cuh").write_text("\n" * 9 + "if (x) {\n  y *= z;\n}\n")
    result = run_profile_script(tmp_path, "stall_by_line.py", profile, listing, "--kernel", "_Z6kernelv", "--file",
                                "k.cuh", "--lines", "10-12", "--executed")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "6 instructions, 410 warp instructions executed"
    by_line = {int(line.split()[0]): line for line in lines[2::2]}
    assert [by_line[n].split()[1:3] for n in (10, 11, 12)] == [["200", "48.8%"], ["10", "2.4%"], ["200", "48.8%"]]
    assert lines[2] != by_line[11]  # ranked: the lines of 200 first
    assert lines[lines.index(by_line[11]) + 1].split() == ["FMUL", "10"]
    assert "y *= z;" in by_line[11]


def test_stall_hotspots_mix_totals_each_opcode(tmp_path):
    """scripts/stall_hotspots.py --mix: per opcode without predicate or modifiers, the instructions executed and
    the share of the samples, and the kernel's stall reasons; one block per CSV."""
    profile, _ = write_made_up_profile(tmp_path)
    result = run_profile_script(tmp_path, "stall_hotspots.py", "--mix", profile, profile)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("== ") for line in lines) == 2
    assert lines[0].endswith("410 warp instructions executed, 67 stall samples")
    assert lines[1].split(": ", 1)[1] == "no_inst 76.1%, wait 23.9%"
    fmul = next(line for line in lines if line.split()[0] == "FMUL")
    assert fmul.split()[1:4] == ["10", "2.4%", "1.5%"]
    bra = next(line for line in lines if line.split()[0] == "BRA")
    assert bra.split()[1] == "100"
    one = run_profile_script(tmp_path, "stall_hotspots.py", profile, profile)
    assert one.returncode == 2 and "one CSV, unless --mix" in one.stderr


def run_device_build(tmp_path, kernels_usable, *args):
    """scripts/device_build.sh sourced by a stand-in driver, with python3 and nvidia-smi stubbed as shell functions
    (the build and the import check are python3 calls; FlashMLA's build too)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    driver = f"""
nvidia-smi() {{ echo stub-gpu; }}
python3() {{
  if [ "$1" = -c ] && [[ "$2" == *kernels_available* ]]; then return {0 if kernels_usable else 1}; fi
  echo "stub python3 $1"
}}
OUT={tmp_path}
source scripts/device_build.sh {" ".join(args)}
wait_flashmla
echo "driver goes on t0=$t0"
"""
    return subprocess.run(["bash", "-c", driver], capture_output=True, text=True, cwd=root)


def test_device_build_goes_on_with_a_usable_extension_and_waits_for_flashmla(tmp_path):
    result = run_device_build(tmp_path, True, "--flashmla")
    assert result.returncode == 0, result.stderr
    assert "build rc=0" in result.stdout
    assert "FlashMLA build rc=0" in result.stdout and "driver goes on t0=" in result.stdout
    assert (tmp_path / "build.log").exists() and (tmp_path / "build_flashmla.log").exists()


def test_device_build_stops_the_driver_when_the_extension_is_unusable(tmp_path):
    """Else the driver would go on to time the pure-JAX fallback as if it were the kernels."""
    result = run_device_build(tmp_path, False)
    assert result.returncode == 1
    assert "driver goes on" not in result.stdout
    assert not (tmp_path / "build_flashmla.log").exists()


def test_device_grid_merges_the_records_after_each_seqlen_and_keeps_its_deadline(tmp_path):
    """scripts/device_grid.sh with the bench stood in for by a python3 on PATH: after each s_k the tables and all
    records so far are in OUT_DIR, merged into one JSON; with a deadline already past after the first s_k, the
    others are not started."""
    real_python = sys.executable
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = jax_flashmla.bench ]; then
  s_k=$4 out=${{12}}
  mkdir -p "$out"
  echo "[{{\\"s_k\\": $s_k}}]" > "$out/results.json"
  echo "  128 $s_k 1 16 row"
  [ "$s_k" = 4096 ] && sleep 2
  exit 0
fi
exec {real_python} "$@"
""")
    fake.chmod(0o755)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    out.mkdir()
    full = subprocess.run(["bash", str(root / "scripts" / "device_grid.sh"), str(out), "30"], capture_output=True,
                          text=True, cwd=root, env=env)
    assert full.returncode == 0, full.stderr
    assert [line.split()[1] for line in full.stdout.splitlines() if line.startswith("s_k ")] == \
        ["4096", "8192", "16384", "32768"]
    assert "4 records" in full.stdout
    assert sorted(r["s_k"] for r in json.loads((out / "h100_grid.json").read_text())) == [4096, 8192, 16384, 32768]
    assert len((out / "grid_tables.txt").read_text().splitlines()) == 4
    cut = subprocess.run(["bash", str(root / "scripts" / "device_grid.sh"), str(out), "30", "1"], capture_output=True,
                         text=True, cwd=root, env=env)
    assert cut.returncode == 0, cut.stderr
    assert "deadline: s_k 8192 not run" in cut.stdout
    assert [r["s_k"] for r in json.loads((out / "h100_grid.json").read_text())] == [4096]
