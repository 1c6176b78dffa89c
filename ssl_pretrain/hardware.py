"""What the hardware runs fast: bf16 where it is native, fp32 elsewhere.

bf16 autocast is 1.6x (smallconv) to 3x (ResNet-18) faster than fp32 on a CPU with AMX
(BENCHMARKS.md section 1), and 10-40x *slower* on one without bf16 instructions, where oneDNN
emulates it (a 2-core AMD EPYC with AVX2: 35 images/s instead of 420 for the CPU preset, issue
#12). So ``precision: auto`` asks the hardware instead of trusting a preset:

* CUDA: bf16 from compute capability 8 (Ampere) on, where tensor cores run it;
* CPU: bf16 where oneDNN has native bf16 instructions (AMX tiles, or AVX512-BF16), and only if
  ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) does not hold oneDNN below them - that is how
  an AMX machine is made to behave like an AVX2 one, and oneDNN obeys it, so must we;
* anything else (MPS, other CPUs): fp32.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
             "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
"""oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) that still allow its native bf16 kernels."""
EMULATED_BF16_SLOWDOWN = "10-40x"
"""bf16 autocast on a CPU without bf16 instructions, against fp32 (issue #12: 35.5 vs ~420
images/s for the CPU preset on a 2-core AMD EPYC with AVX2)."""


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is held to by the environment, upper-cased, or None."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value else None


def cpu_bf16_instructions() -> bool:
    """AMX tiles or AVX512-BF16 on this CPU (torch's cpuinfo, not /proc parsing)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if bool(getattr(torch.cpu, probe)()):
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def cpu_bf16_native() -> bool:
    """Whether oneDNN will run bf16 natively here (instructions present and not capped away)."""
    cap = onednn_isa_cap()
    return cpu_bf16_instructions() and (cap is None or cap in BF16_ISAS)


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 autocast speeds ``device`` up rather than being emulated."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def describe_cpu() -> str:
    """A short description of the CPU's relevant instructions, for logs and benchmark tables."""
    cap = onednn_isa_cap()
    capability = torch.backends.cpu.get_cpu_capability()
    native = "native bf16" if cpu_bf16_native() else "no native bf16"
    return f"{capability}, {native}" + (f" (oneDNN held to {cap})" if cap else "")


def resolve_precision(precision: str, device: torch.device) -> bool:
    """``train.precision`` -> whether to train under bf16 autocast.

    ``auto``: bf16 where native (``bf16_native``), fp32 elsewhere. A forced ``bf16`` where it is
    emulated runs as asked, with a warning that names the cost and the fix.
    """
    native = bf16_native(device)
    if device.type == "cpu":
        where = describe_cpu()
    elif device.type == "cuda":
        where = "compute capability {}.{}".format(*torch.cuda.get_device_capability(device))
    else:
        where = device.type
    if precision == "auto":
        log.info("precision auto: %s on %s (%s)", "bf16 autocast" if native else "fp32", device.type, where)
        return native
    if precision == "bf16" and not native:
        log.warning("precision bf16 on a %s without native bf16 (%s): emulated, typically %s slower than "
                    "fp32; use train.precision=auto or fp32", device.type, where, EMULATED_BF16_SLOWDOWN)
    return precision == "bf16"
