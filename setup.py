"""Optional install-time build of sqdist's compiled CPU SQ kernels (csrc/).

A plain ``pip install -e .`` compiles nothing: sqdist JIT-builds the kernels on
first use, once per source change, into ``~/.cache/sqdist/kernels``
(``SQDIST_KERNEL_CACHE``). To compile them during the install instead::

    SQDIST_BUILD_EXT=cpu pip install --no-build-isolation -e .   # the C++/OpenMP op

(The GPU's kernels are Triton's, compiled by Triton on first use: nothing to build here.)

``--no-build-isolation`` lets the build see the installed torch. A failed build
is reported and skipped: sqdist then falls back to the JIT build or the reference.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _kernel_build_options() -> dict:
    want = os.environ.get("SQDIST_BUILD_EXT", "").strip().lower()
    if want in ("", "0", "no", "none"):
        return {}
    if want not in ("1", "cpu"):
        sys.exit(f"SQDIST_BUILD_EXT={want!r}; allowed: cpu (or unset; the GPU's Triton kernels need no build)")
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("sqdist: SQDIST_BUILD_EXT is set but torch is not importable here (install with "
              "--no-build-isolation); the kernels will be JIT-built on first use", file=sys.stderr)
        return {}
    # sqdist/quant/kernels/_build.py holds the flags and the source hash; load it without importing sqdist
    spec = importlib.util.spec_from_file_location("_sqdist_kernel_build", ROOT / "sqdist" / "quant" / "kernels" / "_build.py")
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)
    csrc = ROOT / "csrc"
    out_dir = ROOT / "sqdist" / "quant" / "kernels"

    key = kb.source_hash("cpu")
    sources = [str((csrc / s).relative_to(ROOT)) for s in kb.SOURCES["cpu"]]
    ext = cpp_extension.CppExtension("sqdist.quant.kernels._sq_cpu", sources, include_dirs=[str(csrc)],
                                     extra_compile_args=[*kb.CFLAGS, f"-DSQDIST_SOURCE_HASH={key}"],
                                     extra_link_args=list(kb.LDFLAGS))
    ext.sqdist_stamp = (out_dir / "_sq_cpu.hash", key)
    exts = [ext]

    class BuildKernels(cpp_extension.BuildExtension):
        """Builds each op; a failure is reported, never fatal (the JIT build or the reference remain)."""

        def build_extension(self, e):
            stamp, key = e.sqdist_stamp
            stamp.unlink(missing_ok=True)
            try:
                super().build_extension(e)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                print(f"sqdist: building {e.name} failed ({exc}); it will be JIT-built on first use", file=sys.stderr)
                return
            stamp.write_text(key + "\n")

    return {"ext_modules": exts,
            "cmdclass": {"build_ext": BuildKernels.with_options(no_python_abi_suffix=True)}}


setup(**_kernel_build_options())
