"""Build the compiled kernels.

Every ``ext/<name>.pyx`` becomes the extension module ``bowretrieval._ext.<name>``; plain C sources
that belong to it live in ``ext/<name>/`` and are compiled into the same module.  Cython writes its
generated C into ``build/`` so no generated file ever lands in the source tree.
"""
import glob
import os
import platform
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flags():
    compile_args = ["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
    link_args = ["-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        compile_args.append("-mpopcnt")
    if sys.platform == "darwin":  # Apple clang has no -fopenmp by default
        compile_args = [a for a in compile_args if a != "-fopenmp"]
        link_args = []
    return compile_args, link_args


def extensions():
    compile_args, link_args = _flags()
    exts = []
    for pyx in sorted(glob.glob(os.path.join("ext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        srcdir = os.path.join("ext", name)
        sources = [pyx] + sorted(glob.glob(os.path.join(srcdir, "*.c")))
        exts.append(
            Extension(
                f"bowretrieval._ext.{name}",
                sources,
                include_dirs=[numpy.get_include(), srcdir, "ext"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
        )
    return cythonize(
        exts,
        build_dir="build/cython",
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


packages = find_packages(include=["bowretrieval", "bowretrieval.*"])
setup(
    # sfm/ and configs/ live at the top of the source tree and are installed inside the package;
    # configs ship as data (bowretrieval/configs/*.yaml) so `--config NAME.yaml` works after pip install
    packages=packages + ["bowretrieval.sfm", "bowretrieval.configs"],
    package_dir={"bowretrieval.sfm": "sfm", "bowretrieval.configs": "configs"},
    package_data={"bowretrieval.configs": ["*.yaml"]},
    ext_modules=extensions(),
)
