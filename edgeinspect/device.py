"""What the CPU is and which of its features decide how the engines run (standard library only)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), sysctl (macOS), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        proc = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU features that decide INT8/FP16 speed (AVX2, AVX-512, VNNI, AMX, NEON...), where listed."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "fma",
              "asimd", "asimddp", "fphp", "i8mm")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return ["arm64"] if platform.machine() == "arm64" else []


def saturates_eight_bit_weights() -> bool:
    """True on an x86 CPU without VNNI (or whose features cannot be read): ONNX Runtime's uint8 x int8 kernels
    there add the products in pairs in 16-bit integers, which 8-bit INT8 weights can saturate (7-bit ones cannot).
    VNNI adds them in 32 bits; ARM CPUs widen first."""
    if platform.machine().lower() not in X86:
        return False
    return not {"avx512_vnni", "avx_vnni"} & set(cpu_flags())
