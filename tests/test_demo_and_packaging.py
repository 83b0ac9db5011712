"""The demo (single process and DistributedDataParallel on two CPU processes) and the sdist."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(args, cwd, timeout=300, **env):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_demo_runs_end_to_end(tmp_path):
    out = run([sys.executable, "-m", "torch_spatialnorm.demo", "--device", "cpu", "--epochs", "1", "--out", str(tmp_path)], REPO)
    assert (tmp_path / "photograph.png").stat().st_size > 10_000
    assert out.count("test accuracy") == 2
    assert "gradcheck of spatial_normalization (float64, 4x3 window): passed" in out


def test_data_parallel_ranks_end_with_identical_weights(tmp_path):
    run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "torch_spatialnorm.demo",
         "--device", "cpu", "--epochs", "1", "--skip-picture", "--skip-gradcheck", "--out", str(tmp_path)],
        REPO,
    )
    for variant in ("normalized", "plain"):
        first = torch.load(tmp_path / f"weights_{variant}_rank0.pt")
        second = torch.load(tmp_path / f"weights_{variant}_rank1.pt")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first)
    torch.manual_seed(0)  # the demo's initial weights: training must have moved them
    from torch_spatialnorm.demo.training import cnn

    initial = cnn(True).state_dict()
    trained = torch.load(tmp_path / "weights_normalized_rank0.pt")
    assert not torch.equal(initial["0.weight"], trained["0.weight"])


def test_sdist_holds_everything_the_build_needs(tmp_path):
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)], REPO)
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    names = {Path(*Path(n).parts[1:]).as_posix() for n in tarfile.open(sdist).getnames()}
    for needed in ("metal/spatial_norm.metal", "csrc/spatial_norm.h", "csrc/cpu/window_sums.h", "csrc/cpu/power.h",
                   "csrc/cuda/shared_tile.cuh", "csrc/cuda/spatial_norm_cuda.cu", "setup.py", "pyproject.toml"):
        assert needed in names, needed
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(sdist)],
        tmp_path, timeout=600)
    check = (
        "import torch, torch_spatialnorm as sn\n"
        "assert sn.__file__.startswith(%r), sn.__file__\n"
        "assert sn.mps.metal_source_path().read_text().startswith('// Metal kernels')\n"
        "x = torch.randn(2, 3, 9, 9, dtype=torch.float64)\n"
        "torch.testing.assert_close(sn.spatial_normalization(x, 3), sn.reference.spatial_normalization(x, 3))\n"
        "print('ok')\n"
    ) % str(site)
    assert run([sys.executable, "-c", check], tmp_path, PYTHONPATH=str(site)).strip() == "ok"
