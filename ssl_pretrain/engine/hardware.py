"""What the hardware runs fast: bf16 where it is native, fp32 elsewhere.

bf16 autocast is much faster than fp32 on a CPU with AMX, and many times *slower* on one without
bf16 instructions, where oneDNN emulates it (BENCHMARKS.md, "Pretraining throughput"). So
``precision: auto`` asks the hardware instead of trusting a preset:

* CUDA: bf16 from compute capability 8 (Ampere) on, where tensor cores run it;
* CPU with AMX tiles: bf16;
* CPU with AVX512-BF16 but no AMX: not clear-cut - the same CPU model has trained faster in bf16
  on one day and slower on another (BENCHMARKS.md, "Pretraining throughput"), so a few-second
  probe times both on the run's own network and keeps the faster; the answer is cached per
  machine and workload (``precision_cache_path``) and said in the log;
* native bf16 counts only if ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) does not hold
  oneDNN below it - that is how an AMX machine is made to behave like an AVX2 one, and oneDNN
  obeys it, so must we;
* anything else (MPS, other CPUs): fp32.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
             "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
"""oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) that still allow its native bf16 kernels."""
AMX_ISAS = tuple(isa for isa in BF16_ISAS if "AMX" in isa or isa in ("ALL", "DEFAULT"))
"""oneDNN ISA caps that still allow AMX."""
BF16_PROBE_MARGIN = 1.1
"""bf16 must train this much faster than fp32 in the probe to be chosen (fp32 is exact)."""
EMULATED_BF16_SLOWDOWN = "10-40x"
"""bf16 autocast on a CPU without bf16 instructions, against fp32, as the warning words it
(BENCHMARKS.md, "Pretraining throughput")."""


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


def cpu_amx() -> bool:
    """AMX tiles on this CPU, and oneDNN allowed to use them."""
    try:
        present = bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        present = False
    cap = onednn_isa_cap()
    return present and (cap is None or cap in AMX_ISAS)


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo``: a cloud VM's
    "AMD EPYC" alone does not tell a Zen 3 from a Zen 5); ``platform.processor()`` elsewhere."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = (f" (family {fields['cpu family']} model {fields['model']})"
                       if "cpu family" in fields and "model" in fields else "")
            return fields["model name"] + numbers
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precision_cache_path() -> Path:
    """Where probed precision answers are kept: ``$SSL_PRETRAIN_CACHE``, else
    ``$XDG_CACHE_HOME/ssl-pretrain``, else ``~/.cache/ssl-pretrain``; file ``precision.json``."""
    root = os.environ.get("SSL_PRETRAIN_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl-pretrain"
    return Path(root) / "precision.json"


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
        return cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    """Atomic; a cache that cannot be written is only a missed shortcut."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        log.debug("precision cache not written (%s)", error)


def probe_key(workload: str) -> str:
    """The cache key: this CPU, its instruction caps, torch, the threads and the workload."""
    return " | ".join([cpu_name(), describe_cpu(), f"torch {torch.__version__}",
                       f"{torch.get_num_threads()} threads", workload])


def probed_bf16(probe: Callable[[], dict[str, float]] | None, workload: str) -> bool:
    """Whether bf16 autocast trains ``workload`` faster here: the cached answer, else ``probe()``
    (images/s for ``fp32`` and ``bf16``), kept when bf16 wins by ``BF16_PROBE_MARGIN``. Without a
    probe (distributed runs: every rank must agree): fp32."""
    path, key = precision_cache_path(), probe_key(workload)
    cache = _read_cache(path)
    if key in cache and {"fp32", "bf16"} <= set(cache[key]):
        rates, source = cache[key], f"cached in {path}"
    elif probe is None:
        log.info("precision auto: AVX512-BF16 without AMX, not probed here: fp32")
        return False
    else:
        rates, source = probe(), f"probed now, cached in {path}"
        cache[key] = {name: round(float(rate), 1) for name, rate in rates.items()}
        _write_cache(path, cache)
    use_bf16 = rates["bf16"] > BF16_PROBE_MARGIN * rates["fp32"]
    log.info("precision auto: AVX512-BF16 without AMX is not clear-cut; fp32 %.0f images/s, bf16 %.0f (%s): %s",
             rates["fp32"], rates["bf16"], source, "bf16 autocast" if use_bf16 else "fp32")
    return use_bf16


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 autocast speeds ``device`` up rather than being emulated."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def fast_bf16(device: str, probe: Callable[[], dict[str, float]] | None = None, workload: str = "") -> bool:
    """``auto_bf16`` for a ``train.device`` string (``auto`` included), before the network is
    built: decides a preset's ``no_fast_bf16`` variant. An unusable device answers False (the run
    reports it later, in one line)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return False
    try:
        return auto_bf16(torch.device(device), probe, workload)
    except (RuntimeError, AssertionError, ValueError):
        return False


def auto_bf16(device: torch.device, probe: Callable[[], dict[str, float]] | None = None, workload: str = "") -> bool:
    """``precision: auto``'s answer: bf16 where it is native and clearly faster (CUDA from
    compute capability 8, CPUs with AMX tiles); on a CPU with AVX512-BF16 alone, what ``probe``
    (or its cached answer for ``workload``) measured; fp32 elsewhere."""
    if not bf16_native(device):
        return False
    return device.type != "cpu" or cpu_amx() or probed_bf16(probe, workload)


def describe_cpu() -> str:
    """A short description of the CPU's relevant instructions, for logs and benchmark tables."""
    cap = onednn_isa_cap()
    capability = torch.backends.cpu.get_cpu_capability()
    native = "native bf16" if cpu_bf16_native() else "no native bf16"
    masked = cpuid_mask()
    return (f"{capability}, {native}" + (f" (oneDNN held to {cap})" if cap else "")
            + (f", CPUID masked to {masked} for every library" if masked else ""))


def cpuid_mask() -> str | None:
    """The instruction set ``scripts/avx2_only/run.sh`` holds this process to (its library
    preloaded: CPUID itself answers without AVX-512, VNNI, AMX), or None."""
    if "avx2_only" in os.environ.get("LD_PRELOAD", ""):
        return os.environ.get("SSL_CPUID_MASK", "AVX2")
    return None


def resolve_precision(precision: str, device: torch.device,
                      probe: Callable[[], dict[str, float]] | None = None, workload: str = "") -> bool:
    """``train.precision`` -> whether to train under bf16 autocast.

    ``auto``: bf16 where native and clear-cut (CUDA from capability 8, CPUs with AMX); on a CPU
    with AVX512-BF16 but no AMX, ``probe`` decides (``probed_bf16``, cached per ``workload``);
    fp32 elsewhere. A forced ``bf16`` where it is emulated runs as asked, with a warning that
    names the cost and the fix.
    """
    native = bf16_native(device)
    if device.type == "cpu":
        where = describe_cpu()
    elif device.type == "cuda":
        where = "compute capability {}.{}".format(*torch.cuda.get_device_capability(device))
    else:
        where = device.type
    if precision == "auto":
        if native and device.type == "cpu" and not cpu_amx():
            return auto_bf16(device, probe, workload)  # the probe logs its own answer
        log.info("precision auto: %s on %s (%s)", "bf16 autocast" if native else "fp32", device.type, where)
        return native
    if precision == "bf16" and not native:
        log.warning("precision bf16 on a %s without native bf16 (%s): emulated, typically %s slower than "
                    "fp32; use train.precision=auto or fp32", device.type, where, EMULATED_BF16_SLOWDOWN)
    return precision == "bf16"
