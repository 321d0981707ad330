"""The one compiled part: kernels of the CPU VAE (runtime/backends/_vae_kernels.c). Everything else is in
pyproject.toml. The extension is optional: without a C compiler the package installs without it and the
runtime computes them in NumPy (runtime/backends/ort_snake.py)."""

import sys

from setuptools import Extension, setup

# -ffast-math at compile time only (glibc declares sinf's vector variants under it; the link line never sees
# it, so no crtfastmath.o changes the process's denormal mode). The kernel has no NaN or infinity handling
# to lose: the VAE's activations are finite.
SIMD_FLAGS = ["-O3", "-ffast-math", "-fopenmp-simd", "-DACESTEP_SNAKE_SIMD"]

setup(ext_modules=[Extension(
    "acestep_trt.runtime.backends._vae_kernels",
    sources=["runtime/backends/_vae_kernels.c"],
    extra_compile_args=SIMD_FLAGS if sys.platform.startswith("linux") else ["-O3"],
    libraries=["m"] if sys.platform.startswith("linux") else [],
    optional=True,
)])
