"""How the CPU kernels are built where no machine here runs them: Apple silicon (arm64, clang),
and x86-64 with the other compilers users build with (GCC 11, clang).

The loops marked ``// vectorizes`` in csrc/cpu must vectorize when clang compiles them for
aarch64 (NEON), as Apple clang does on a Mac; clang's optimization remarks say which loops did.
setup.py must build the kernels with OpenMP on macOS, or at::parallel_for runs on one thread.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import torch_include_flags

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "cpu" / "spatial_norm_cpu.cpp"
CLANG = "clang++-19"
# The flags setup.py compiles the CPU kernels with (less OpenMP, which changes no loop).
FLAGS = ["-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math"]
AARCH64_HEADERS = Path("/usr/aarch64-linux-gnu/include/c++")
REMARK = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+):\d+: remark: (?P<text>.*)$")


def _setup_module():
    spec = importlib.util.spec_from_file_location("spatialnorm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _marked_loops():
    marked = set()
    for path in (ROOT / "csrc" / "cpu").iterdir():
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if text.rstrip().endswith("// vectorizes"):
                marked.add((path.name, number))
    return marked


def _aarch64_remarks(tmp_path):
    if shutil.which(CLANG) is None:
        pytest.skip(f"{CLANG} is not installed (make test installs Debian's clang-19)")
    command = [CLANG, "--target=aarch64-linux-gnu", *FLAGS, *torch_include_flags(), "-Rpass=loop-vectorize",
               "-Rpass-missed=loop-vectorize", "-S", "-o", str(tmp_path / "kernels.s"), str(KERNELS)]
    if not AARCH64_HEADERS.is_dir():
        pytest.skip(f"no aarch64 C++ headers in {AARCH64_HEADERS} (make test installs Debian's libstdc++-12-dev-arm64-cross)")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    remarks = {}
    for line in result.stderr.splitlines():
        match = REMARK.match(line)
        if match:
            key = (Path(match["file"]).name, int(match["line"]))
            remarks.setdefault(key, []).append(match["text"])
    return remarks


def test_marked_loops_vectorize_for_aarch64(tmp_path):
    marked = _marked_loops()
    assert len(marked) >= 10, "the markers of the loops that must vectorize are gone"
    remarks = _aarch64_remarks(tmp_path)
    for loop in sorted(marked):
        said = remarks.get(loop)
        assert said, f"clang said nothing of the loop at {loop[0]}:{loop[1]}: not a loop, or compiled away"
        assert any(text.startswith("vectorized loop") for text in said), f"{loop[0]}:{loop[1]}: {said}"
        declined = [text for text in said if "not vectorized" in text or "vectorization is not beneficial" in text]
        assert not declined, f"{loop[0]}:{loop[1]} stays scalar in some instantiation: {declined}"


def test_setup_builds_with_openmp_on_linux_and_macos(tmp_path, monkeypatch):
    setup = _setup_module()
    assert setup.openmp_flags("linux") == (["-fopenmp"], ["-fopenmp"])

    # macOS: omp.h found through OMP_PREFIX (as PyTorch's own C++ builder looks for it).
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "omp.h").write_text("")
    monkeypatch.setenv("OMP_PREFIX", str(tmp_path))
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.setattr(setup.shutil, "which", lambda name: None)
    compile_flags, link_flags = setup.openmp_flags("darwin")
    assert compile_flags[:2] == ["-Xclang", "-fopenmp"] and f"-I{tmp_path / 'include'}" in compile_flags
    assert "-lomp" in link_flags

    # No omp.h anywhere: a build that runs on one thread, and says so.
    monkeypatch.setenv("OMP_PREFIX", str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="one thread"):
        assert setup.openmp_flags("darwin") == ([], [])



@pytest.mark.parametrize("compiler", ["g++-11", CLANG])
def test_kernels_compile_for_x86_64_with_gcc_11_and_clang(compiler, tmp_path):
    """GCC 11 (Ubuntu 22.04's) dispatches target_clones on single features, not on x86-64-v4 and
    v3, and knows no __builtin_shufflevector; clang's target_clones takes neither flatten nor
    noinline. Both must still build the x86-64 kernels (the multiversioning errors come at -O0
    too). clang takes the omp.h that ATen includes from GCC, whose OpenMP torch uses."""
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed (make test installs Debian's g++-11 and clang-19)")
    # -O0 overrides FLAGS' -O3: the same errors in a fraction of the time.
    command = [compiler, *FLAGS, "-O0", "-g0", *torch_include_flags(), "-c", "-o", os.devnull, str(KERNELS)]
    if compiler == CLANG:
        gcc_headers = subprocess.run(["g++", "-print-file-name=include"], capture_output=True, text=True).stdout.strip()
        (tmp_path / "omp.h").symlink_to(Path(gcc_headers) / "omp.h")
        assert (tmp_path / "omp.h").exists(), f"no omp.h in {gcc_headers}"
        command[1:1] = ["-isystem", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
