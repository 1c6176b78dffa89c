"""``scripts/avx2_only/run.sh``: a process whose CPUID answers without AVX-512, VNNI and AMX, so
every library in it (torch, onnxruntime, OpenVINO) picks its AVX2 kernels - how this project
measures AVX2-only CPUs on a machine with more."""

import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "scripts" / "avx2_only" / "run.sh"


def _cpuid_faults() -> bool:
    try:
        return "cpuid_fault" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


needs_masking = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("cc") and _cpuid_faults()),
    reason="needs Linux x86-64 with CPUID faulting (cpuid_fault) and a C compiler")


def _run(tmp_path, *code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSL_PRETRAIN_CACHE": str(tmp_path)}
    return subprocess.run([str(RUN), sys.executable, "-c", *code], env=env, capture_output=True, text=True,
                          timeout=120)


@needs_masking
def test_the_masked_process_sees_avx2_and_nothing_wider_and_says_so(tmp_path):
    result = _run(tmp_path, "import torch\n"
                  "from ssl_pretrain.engine.hardware import describe_cpu\n"
                  "print(int(torch.cpu._is_avx2_supported()), int(torch.cpu._is_avx512_supported()),\n"
                  "      int(torch.cpu._is_vnni_supported()), int(torch.cpu._is_avx512_bf16_supported()),\n"
                  "      int(torch.cpu._is_amx_tile_supported()))\n"
                  "print(describe_cpu())")
    assert result.returncode == 0, result.stderr
    flags, description = result.stdout.splitlines()
    # torch's cpuinfo reads CPUID itself (unlike ATEN_CPU_CAPABILITY, which only caps torch's kernels)
    assert flags == "1 0 0 0 0"
    assert description.startswith("AVX2, no native bf16") and "CPUID masked to AVX2" in description
    assert (tmp_path / "avx2_only.so").is_file()  # built into the cache folder, once


@needs_masking
def test_a_real_fault_still_crashes_the_masked_process(tmp_path):
    result = _run(tmp_path, "import ctypes; ctypes.string_at(0)")
    assert result.returncode == -signal.SIGSEGV


def test_without_a_command_it_says_how_to_use_it():
    result = subprocess.run([str(RUN)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith("usage:")
