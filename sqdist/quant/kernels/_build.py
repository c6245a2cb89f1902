"""Find or build the compiled CPU SQ ops (csrc/) and load them into ``torch.ops.sqdist_cpu``.

(The GPU's ops are Triton kernels, :mod:`sqdist.quant.kernels.triton_ops`: Triton compiles them itself.)
Order:

1. a library built at install time (``setup.py`` with ``SQDIST_BUILD_EXT=1``) next to
   this file, when its recorded source hash matches ``csrc/`` (or no ``csrc/`` ships);
2. a JIT build with ``torch.utils.cpp_extension.load`` into
   ``$SQDIST_KERNEL_CACHE`` (default ``~/.cache/sqdist/kernels``), in a folder keyed on
   the hash of the sources, the torch version and the flags: built once, then reused.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "csrc"

SOURCES = {"cpu": ["sq_cpu.cpp"]}
HEADERS = ["sq_common.h", "sq_host.h"]
# -fno-trapping-math lets the selects and divisions of the row loops vectorize; it does
# not change results. No reassociation; but GCC's C++ default is -ffp-contract=fast, so an
# AVX build may fuse a * b + c into one FMA: the loops that must equal their PyTorch form bit for
# bit (codes, scales, Q) have no multiply-add, and the sums are held to theirs within tolerance
CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)  # tuples: cpp_extension appends to the lists it is given


def source_hash(backend: str, csrc: Path = CSRC) -> str:
    """Hash of what decides the compiled library: sources, headers, torch, flags."""
    h = hashlib.sha256()
    for name in sorted(SOURCES[backend] + HEADERS):
        h.update(name.encode())
        h.update((csrc / name).read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{list(CFLAGS)}|{list(LDFLAGS)}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("SQDIST_KERNEL_CACHE") or Path.home() / ".cache" / "sqdist" / "kernels")


def prebuilt(backend: str) -> Path | None:
    """The install-time library for ``backend`` when it matches the sources."""
    libs = sorted(HERE.glob(f"_sq_{backend}*.so"))
    stamp = HERE / f"_sq_{backend}.hash"
    if not libs or not stamp.exists():
        return None
    if CSRC.exists() and stamp.read_text().strip() != source_hash(backend):
        return None  # sources changed since the install: rebuild through the JIT cache
    return libs[0]


def build(backend: str, verbose: bool = False) -> Path:
    """Build (or find in the cache) the library for ``backend``; returns its path.

    Raises RuntimeError with the reason when it cannot be built.
    """
    if backend not in SOURCES:
        raise ValueError(f"backend={backend!r}; allowed: cpu (the GPU's kernels are Triton's, compiled by Triton)")
    if not CSRC.exists():
        raise RuntimeError(f"no sources at {CSRC} (a wheel install without the compiled kernels)")
    key = source_hash(backend)
    name = f"sqdist_{backend}_{key}"
    build_dir = cache_root() / name
    lib = build_dir / f"{name}.so"
    if lib.exists():
        return lib
    # imported only for a real build: importing it on a machine without CUDA prints a warning
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / s) for s in SOURCES[backend]]
    kw = dict(name=name, sources=sources, build_directory=str(build_dir), verbose=verbose,
              extra_cflags=[*CFLAGS, f"-DSQDIST_SOURCE_HASH={key}"], extra_ldflags=list(LDFLAGS),
              extra_include_paths=[str(CSRC)], is_python_module=False)
    started = time.time()
    print(f"[sqdist] building the {backend} SQ kernels into {build_dir} (once per source change)...",
          file=sys.stderr, flush=True)
    cpp_extension.load(with_cuda=False, **kw)
    print(f"[sqdist] built {lib.name} in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    if not lib.exists():
        raise RuntimeError(f"build finished but {lib} is missing")
    return lib


def load(backend: str):
    """Load the ops of ``backend`` into ``torch.ops``; returns the op namespace."""
    from .fake import register_fakes  # shapes for torch.compile's tracer (the C++ registers a CPU kernel only)

    ns = f"sqdist_{backend}"
    if not _registered(ns):
        lib = prebuilt(backend) or build(backend)
        torch.ops.load_library(str(lib))
    register_fakes(ns)
    return getattr(torch.ops, ns)


@functools.lru_cache(maxsize=None)
def load_source(src: Path, flags: tuple[str, ...] = CFLAGS):
    """A plugin's one-file CPU extension (pybind11 module) built on first use into ``cache_root()``,
    keyed on its source, torch and the flags; None (and a warning) where it cannot be built, so
    the caller takes its PyTorch path. Once per process and source: later calls return the same."""
    import warnings

    h = hashlib.sha256(src.read_bytes() + f"{torch.__version__}|{sys.version_info[:2]}|{list(flags)}".encode())
    name = f"{src.stem}_{h.hexdigest()[:16]}"
    try:
        from torch.utils import cpp_extension

        folder = cache_root() / name
        folder.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name=f"sqdist_{name}", sources=[str(src)], extra_cflags=list(flags),
                                  extra_ldflags=list(LDFLAGS), build_directory=str(folder), verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: the caller's PyTorch path, same results
        warnings.warn(f"sqdist: {src.name} could not be built ({type(e).__name__}: {e}); using the PyTorch path")
        return None


def _registered(ns: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{ns}::quantize", "")
        return True
    except RuntimeError:
        return False


if __name__ == "__main__":  # python -m sqdist.quant.kernels._build [cpu]
    targets = sys.argv[1:] or ["cpu"]
    for b in (["cpu"] if targets == ["all"] else targets):
        print(build(b, verbose="-v" in os.environ.get("SQDIST_BUILD_FLAGS", "")))
