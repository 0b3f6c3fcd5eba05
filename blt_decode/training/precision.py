"""Which numeric precision a training run computes in: bfloat16 autocast where the device multiplies
bfloat16 matrices natively, float32 elsewhere (master weights and optimizer state stay float32).

On a CPU with AMX (``amx_bf16``) or AVX-512 BF16 a bfloat16 matrix product runs about 10x faster than a
float32 one (docs/training.md); without them bfloat16 is emulated and slower than float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: CPU flags (as /proc/cpuinfo names them) of native bfloat16 dot-product instructions
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native bfloat16 instruction sets this CPU reports (empty when it has none).

    Read from /proc/cpuinfo on Linux; elsewhere oneDNN's own check stands for them (``"onednn"``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ("onednn",) if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def resolve_bf16(requested: bool | None, device: torch.device) -> tuple[bool, str]:
    """(autocast on?, a line saying why) for ``--bf16`` (True), ``--no-bf16`` (False) or unset (None:
    on for CUDA and for CPUs with native bfloat16 instructions)."""
    if device.type == "cuda":
        on = True if requested is None else requested
        return on, f"bfloat16 autocast {'on' if on else 'off'} (CUDA{', --no-bf16' if not on else ''})"
    flags = cpu_bf16_flags()
    if requested is None:
        if flags:
            return True, f"bfloat16 autocast on: this CPU multiplies bfloat16 natively ({', '.join(flags)}); --no-bf16 for float32"
        return False, ("float32: this CPU has no native bfloat16 instructions (no amx_bf16 or avx512_bf16), "
                       "where bfloat16 would be slower; --bf16 forces it")
    if requested and not flags:
        return True, ("bfloat16 autocast on (--bf16), although this CPU has no native bfloat16 instructions "
                      "(no amx_bf16 or avx512_bf16): expect it to be slower than float32")
    return requested, f"bfloat16 autocast {'on (--bf16)' if requested else 'off (--no-bf16)'}"
