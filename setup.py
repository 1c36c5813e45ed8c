"""Build hook for the native CPU kernels (metadata lives in pyproject.toml).

Compiles ``src/gracevlm/kernels/csrc/gv_int4.c`` into ``gracevlm/kernels/_gv_int4<EXT_SUFFIX>`` and
``csrc/gv_int8.c`` + ``csrc/gv_igemm.c`` + ``csrc/gv_attn.c`` + ``csrc/gv_norm.c`` + ``csrc/gv_layer.c`` into ``gracevlm/kernels/_gv_int8<EXT_SUFFIX>``, plain C shared
libraries that gracevlm loads with ctypes (they have no Python module init). Baseline flags only; the
AVX2/FMA code paths carry their own target attributes and are chosen at run time. A failed compile does
not fail the install: gracevlm then compiles the library on first use, or falls back to torch kernels.
"""
import hashlib
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = Path("src/gracevlm/kernels/csrc/gv_int4.c")
OPENMP = ["-fopenmp"]


class OptionalBuildExt(build_ext):
    """Build with OpenMP; retry without the AVX-512 code (compilers without its intrinsics), then without
    OpenMP; only warn if the C compiler fails altogether."""

    def get_export_symbols(self, ext):
        return []  # not a Python extension module: no PyInit_ symbol to export

    def build_extension(self, ext):
        base_args, base_link, base_macros = list(ext.extra_compile_args), list(ext.extra_link_args), list(ext.define_macros)
        variants = [(True, False), (True, True), (False, False), (False, True)]  # (OpenMP, GV_NO_AVX512)
        errors = []
        for openmp, no_avx512 in variants:
            ext.extra_compile_args = [a for a in base_args if openmp or a not in OPENMP]
            ext.extra_link_args = [a for a in base_link if openmp or a not in OPENMP]
            ext.define_macros = base_macros + ([("GV_NO_AVX512", "1")] if no_avx512 else [])
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, rejects -fopenmp or the AVX-512 intrinsics
                errors.append(exc)
                continue
            if not openmp or no_avx512:
                self.warn("gracevlm: built the native INT4 kernels" + (" without OpenMP (single-threaded)"
                          if not openmp else "") + (" without the AVX-512 code" if no_avx512 else ""))
            return
        self.warn(f"gracevlm: native INT4 kernels not built ({errors[0]}; {errors[-1]}); "
                  "they will be compiled on first use or replaced by torch kernels")


digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
native = Extension(
    "gracevlm.kernels._gv_int4",
    sources=[str(SOURCE)],
    define_macros=[("GV_SOURCE_HASH", f'"{digest}"')],
    extra_compile_args=["-O3", "-fvisibility=hidden", *OPENMP],
    extra_link_args=OPENMP,
    libraries=["m"],
)

SOURCES8 = [Path("src/gracevlm/kernels/csrc/gv_int8.c"), Path("src/gracevlm/kernels/csrc/gv_igemm.c"),
            Path("src/gracevlm/kernels/csrc/gv_attn.c"), Path("src/gracevlm/kernels/csrc/gv_norm.c"),
            Path("src/gracevlm/kernels/csrc/gv_layer.c")]
digest8 = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES8)).hexdigest()[:16]  # as native_int8.source_hash
native8 = Extension(
    "gracevlm.kernels._gv_int8",
    sources=[str(p) for p in SOURCES8],
    define_macros=[("GV_SOURCE_HASH", f'"{digest8}"')],
    extra_compile_args=["-O3", "-fvisibility=hidden", *OPENMP],
    extra_link_args=OPENMP,
    libraries=["m"],
)

setup(ext_modules=[native, native8], cmdclass={"build_ext": OptionalBuildExt})
