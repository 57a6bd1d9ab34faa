"""The one thing pyproject.toml cannot say: minivae's optional C extension.

``minivae.engine._kernels`` (minivae/engine/_kernels.c) holds one-pass CPU kernels for the NumPy training
step. It is optional: where no C compiler is found, or the build fails, pip installs minivae
without it, and minivae runs the NumPy twins of those kernels (same results, slower; see
minivae/engine/kernels.py). It uses only the Python C API (the buffer protocol), not NumPy's headers,
so the build needs nothing beyond setuptools.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "unix":  # gcc or clang
            for ext in self.extensions:
                # -fno-math-errno lets sqrt vectorize; -ffp-contract=off keeps a * b + c two
                # roundings, as in NumPy, whatever the CPU: results do not depend on the build.
                ext.extra_compile_args += ["-O3", "-std=c99", "-fno-math-errno",
                                           "-ffp-contract=off", "-pthread"]
                ext.extra_link_args += ["-pthread"]   # the kernels' worker team
        super().build_extensions()


setup(
    ext_modules=[Extension("minivae.engine._kernels", ["minivae/engine/_kernels.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
