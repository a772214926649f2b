"""The narrow decode kernel's index arithmetic, checked on the host (CI has no GPU to run the kernel).

src/kernels/decode_narrow.cuh writes its offsets and fragment coordinates by hand: the cp.async offsets of Q
(and that each tile's descriptor reads Q there), the stmatrix.trans addresses of P, which query row and token
each accumulator value is, and the claim that a page tile read through CuTe's MN-major V^T layout is the bytes
TMA wrote. tests/host/narrow_layouts.cu checks each against CuTe's layouts and partitions (and the stmatrix
store, emulated lane by lane from the PTX ISA's description) for both element types and both widths, on the
host.
"""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_narrow_kernel_offsets_match_cute_layouts(tmp_path, cuda_build_tools):
    nvcc, cutlass = cuda_build_tools
    binary = tmp_path / "narrow_layouts"
    build = subprocess.run(
        [nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-O1",
         f"-I{ROOT / 'src'}", f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools' / 'util' / 'include'}",
         str(ROOT / "tests" / "host" / "narrow_layouts.cu"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([binary], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-4000:]
