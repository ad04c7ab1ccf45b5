"""Every environment switch the kernels obey, in one place. Each is read when it is used, not at import: setting
one in a running process (a test, a benchmark's A/B run) takes effect on the next launch or tile choice.

    TRITON_INTERPRET=1           Triton's CPU interpreter (must be set before triton is imported; the tests run
                                 such code in a subprocess): kernels take the interpreter's tile sizes and exact
                                 rounding paths
    HMTINY_PDL=0                 launch without programmatic dependent launch (kernels/pdl.py)
    HMTINY_PDL_EARLY=1           PDL kernels let the next kernel start before their own wait, not after it
                                 (kernels/pdl.py; an A/B switch, slower on an H100)
    HMTINY_COMPILE_AHEAD=0       the engine does not compile its step's Triton kernels side by side before its
                                 first capture (kernels/ahead.py): they compile one by one in the warm-up run
    HMTINY_GEMV_MAX_SPLIT=N      cap the K slices of kernels.gemv's timed tiles (default 4)
    HMTINY_TILE_CACHE=PATH|0     where kernels.gemv keeps its tile picks and kernels.int8_matmul its tuning picks
                                 (default ~/.cache/hmtiny/gemv_tiles.json; 0 = nowhere)
    HMTINY_INT8_AUTOTUNE=0       int8_matmul takes each regime's first config instead of timing them all
    HMTINY_INT8_FAST_LAUNCH=0    int8_matmul launches through Triton's own path instead of its launch cache
    HMTINY_INT8_TRITON=1         hmtiny.quant runs the int8 Triton kernels off CUDA too (tests, under the interpreter)
    HMTINY_INT8_OVERLAP=0        the LoRA group node dequantises int8 bases in line, not on a side stream beside the
                                 products (hmtiny/lora.py's _dense_weights)
    HMTINY_L2_PREFETCH_MB=N      at most N MiB of the next weight a decode GEMV asks L2 to fetch (kernels/prefetch.py,
                                 default 8; 0 = none)
    HMTINY_DEQUANT_TILE=BN,BK,W  kernels.int8_matmul.dequantize's tile (rows, columns, warps): an A/B switch for
                                 benchmarks
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "on")  # as Triton reads its own boolean switches


def interpreting() -> bool:
    """Triton runs on the CPU interpreter (TRITON_INTERPRET, read the way Triton reads it)."""
    return _flag("TRITON_INTERPRET", False)


def pdl_allowed() -> bool:
    return _flag("HMTINY_PDL", True)


def pdl_early() -> bool:
    return _flag("HMTINY_PDL_EARLY", False)


def compile_ahead() -> bool:
    return _flag("HMTINY_COMPILE_AHEAD", True)


def gemv_max_split() -> int:
    return int(os.environ.get("HMTINY_GEMV_MAX_SPLIT") or 4)


def tile_cache_path() -> Path | None:
    path = os.environ.get("HMTINY_TILE_CACHE")
    if path == "0":
        return None
    if path:
        return Path(path)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hmtiny" / "gemv_tiles.json"


def l2_prefetch_bytes() -> int:
    return int(float(os.environ.get("HMTINY_L2_PREFETCH_MB") or 8) * 2**20)


def int8_autotune() -> bool:
    return _flag("HMTINY_INT8_AUTOTUNE", True)


def int8_fast_launch() -> bool:
    return _flag("HMTINY_INT8_FAST_LAUNCH", True) and not interpreting()


def dequant_tile() -> tuple[int, int, int] | None:
    value = os.environ.get("HMTINY_DEQUANT_TILE")
    return tuple(int(v) for v in value.split(",")) if value else None


def int8_overlap() -> bool:
    return _flag("HMTINY_INT8_OVERLAP", True)


def int8_triton_off_cuda() -> bool:
    return _flag("HMTINY_INT8_TRITON", False)


@contextlib.contextmanager
def overridden(**values: str):
    """Set switches inside a block (benchmarks' A/B runs), e.g. `with overridden(HMTINY_PDL="0"):`."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
