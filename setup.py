"""Build the compiled fastpath.

Each ``broker/_fastpath/<name>.pyx`` becomes the extension
``broker._fastpath.<name>``; its pure-Python twin is ``<name>_py.py``.
``BROKER_NO_EXTENSIONS=1`` at build time skips compiling (the twins serve).
Directives are set here, not sprinkled through the sources.
"""
import glob
import os

from setuptools import Extension, setup

COMPILER_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}

# Modules that call zlib's C API directly.
LINK_ZLIB = {"frames"}


def extensions():
    if os.environ.get("BROKER_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    from Cython.Build import cythonize

    exts = []
    for path in sorted(glob.glob("broker/_fastpath/*.pyx")):
        name = os.path.splitext(os.path.basename(path))[0]
        exts.append(
            Extension(
                f"broker._fastpath.{name}",
                [path],
                libraries=["z"] if name in LINK_ZLIB else [],
                extra_compile_args=["-O3"],
            )
        )
    return cythonize(
        exts,
        compiler_directives=COMPILER_DIRECTIVES,
        annotate=os.environ.get("BROKER_CYTHON_ANNOTATE", "") not in ("", "0"),
    )


setup(ext_modules=extensions())
