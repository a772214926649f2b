"""The Hopper decode kernels' machine code, checked on any machine with nvcc (CI has no GPU).

ptxas serializes every wgmma of a kernel (a wait after each one) when it cannot prove that no accumulator is
touched while a wgmma is in flight, and says so only as `ptxas info` (C7515, C7520, ...). The kernel still
computes the right answer, each wgmma waiting for the one before, and no correctness test notices; two
shapes of branches around an S issued in the epilogue did exactly that (benchmarks/NOTES.md, "The next
chunk's first S behind the stores"). Register spills are the same kind of silent loss. This test compiles the
bf16 instantiation with the build's flags and `ptxas -v`, and fails on either. (The single-softmax kernel
spills 16 bytes, as it long has; the seesaw and narrow kernels are held to none.) It does the same for the
copies scripts/trace_chunk_timeline.py writes, and for the narrow kernel's stall counters
(-DJFM_NARROW_STALLS), whose records must not change what they measure: a printf in the decode kernel
serialized it (C7510) until the records moved to a printing kernel of their own.
It also holds every combine kernel instantiation to 64 registers without spills.
"""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERIALIZED = "wgmma.mma_async instructions are serialized"


def _ptxas_report(src: pathlib.Path, out_dir: pathlib.Path, tools, defines=(), source="decode_bf16.cu") -> str:
    nvcc, cutlass = tools
    # The flags of CMakeLists.txt's jfm_kernels target, for sm_90a.
    command = [nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
               "--use_fast_math", "-lineinfo", *defines, f"-I{src}", f"-I{cutlass / 'include'}",
               f"-I{cutlass / 'tools' / 'util' / 'include'}", "-cubin", "-o", str(out_dir / "kernels.cubin"),
               "-Xptxas", "-v", str(src / "kernels" / source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr + result.stdout


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory, cuda_build_tools):
    return _ptxas_report(ROOT / "src", tmp_path_factory.mktemp("codegen"), cuda_build_tools)


def _kernels(report: str) -> dict[str, dict]:
    """Per entry function: its spill stores, registers and the ptxas notes that name it."""
    kernels, current = {}, None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = m.group(1)
            kernels[current] = {"spill_stores": None, "registers": None, "notes": []}
        elif current and (m := re.search(r"(\d+) bytes spill stores", line)):
            kernels[current]["spill_stores"] = int(m.group(1))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            kernels[current]["registers"] = int(m.group(1))
    # Notes name their function, and ptxas may print them before that function's "Compiling" line.
    for line in report.splitlines():
        for name, info in kernels.items():
            if f"'{name}'" in line and "Compiling entry function" not in line:
                info["notes"].append(line)
    return kernels


def test_no_decode_kernel_has_its_wgmma_serialized(ptxas_report):
    kernels = _kernels(ptxas_report)
    hopper = [name for name in kernels if "seesaw" in name or "hopper" in name or "narrow" in name]
    assert len(hopper) == 4, f"expected the seesaw, single-softmax and two narrow kernels, found {list(kernels)}"
    for name in hopper:
        serialized = [note for note in kernels[name]["notes"] if SERIALIZED in note]
        assert not serialized, f"{name}: {serialized}"


def test_narrow_kernels_get_no_injected_wgmma_wait(ptxas_report):
    """ptxas adds a `warpgroup.wait` (C7517) where it believes a wgmma may still be writing registers that are
    read. In the narrow kernel one sat before the release of each page's V tiles, and held them until the next
    page had landed (benchmarks/NOTES.md, version 2.12)."""
    narrow = {name: info for name, info in _kernels(ptxas_report).items() if "narrow" in name}
    assert len(narrow) == 2
    for name, info in narrow.items():
        assert not [note for note in info["notes"] if "(C7517)" in note], name


def test_seesaw_and_narrow_kernels_fit_their_registers_without_spills(ptxas_report):
    kernels = [info for name, info in _kernels(ptxas_report).items() if "seesaw" in name or "narrow" in name]
    assert len(kernels) == 3
    for info in kernels:
        assert info["spill_stores"] == 0 and info["registers"] <= 255, info


@pytest.mark.parametrize("mode", ["timeline", "pair-waits", "pair-events", "tile-events"])
def test_traced_copies_keep_the_wgmma_pipelined(tmp_path, mode, trace_script, cuda_build_tools):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src)
    kernel, launch = tmp_path / trace_script.KERNEL, tmp_path / trace_script.LAUNCH
    kernel.write_text(trace_script.instrument(kernel.read_text(), mode))
    launch.write_text(trace_script.instrument_launch(launch.read_text()))
    kernels = _kernels(_ptxas_report(src, tmp_path, cuda_build_tools))
    (seesaw,) = [info for name, info in kernels.items() if "seesaw" in name and "decode_kernel" in name]
    assert not [note for note in seesaw["notes"] if SERIALIZED in note], seesaw["notes"]


def test_narrow_stall_counters_keep_the_wgmma_pipelined(tmp_path, cuda_build_tools):
    """The build with -DJFM_NARROW_STALLS (src/kernels/narrow_stalls.cuh), which a GPU session runs through
    scripts/compare_builds.sh, compiles, and times the kernel it instruments: no serialized wgmma, no injected
    wait, no spills; and its printing kernel is there."""
    kernels = _kernels(_ptxas_report(ROOT / "src", tmp_path, cuda_build_tools, defines=("-DJFM_NARROW_STALLS",)))
    narrow = {name: info for name, info in kernels.items() if "narrow" in name and "decode_kernel" in name}
    assert len(narrow) == 2, list(kernels)
    for name, info in narrow.items():
        assert not [note for note in info["notes"] if SERIALIZED in note or "(C7517)" in note], (name, info["notes"])
        assert info["spill_stores"] == 0, (name, info)
    assert any("print_stalls" in name for name in kernels), list(kernels)


def test_combine_kernels_stay_within_64_registers(tmp_path, cuda_build_tools):
    """The combine (src/kernels/combine.cu) holds several splits' partials in flight per lane, 32 floats, within 64
    registers, so that as many of its CTAs wait beside a decode CTA as when it held one split's (benchmarks/NOTES.md,
    versions 2.24-2.26): every instantiation (bf16 and fp16; two and four warps per row) at most 64
    registers, and no spills."""
    kernels = _kernels(_ptxas_report(ROOT / "src", tmp_path, cuda_build_tools, source="combine.cu"))
    combines = {name: info for name, info in kernels.items() if "combine_kernel" in name}
    assert len(combines) == 4, list(kernels)
    for name, info in combines.items():
        assert info["spill_stores"] == 0 and info["registers"] <= 64, (name, info)
