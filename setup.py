"""Build script: CMake + nvcc + pybind11 (+ ninja) build crossspec_kernels._C into the package.

Metadata lives in pyproject.toml; this file only decides whether and how to build the extension.

Environment knobs:
  CROSSSPEC_CUDA_ARCHS  CUDA architectures, CMake syntax, ';' or ',' separated (default "80;90a":
                        sm_80 and sm_90a). "8.0;9.0a" is accepted too.
  MAX_JOBS              parallel build jobs (default: number of CPUs).
  CROSSSPEC_SKIP_CUDA=1 skip the extension: a pure-Python install (reference and Triton backends).

Without nvcc (looked up in CUDACXX, CUDA_HOME/bin, CUDA_PATH/bin, PATH, /usr/local/cuda/bin) the
install also succeeds as pure Python, with one warning; the CUDA backend then raises an error that says
how to build it. A failing nvcc build is an error, not a silent fallback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90a"
EXTENSION_NAME = "crossspec_kernels._C"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_nvcc() -> tuple[str | None, str]:
    """Path of nvcc, or None with a sentence saying where it was looked for."""
    candidates: list[tuple[str, str]] = []
    if os.environ.get("CUDACXX"):
        candidates.append(("CUDACXX", os.environ["CUDACXX"]))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((var, os.path.join(os.environ[var], "bin", "nvcc")))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(("PATH", on_path))
    candidates.append(("default location", "/usr/local/cuda/bin/nvcc"))
    for _source, path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path), ""
    return None, "no nvcc found in CUDACXX, CUDA_HOME/bin, CUDA_PATH/bin, PATH or /usr/local/cuda/bin"


def cuda_archs() -> str:
    """CROSSSPEC_CUDA_ARCHS normalised to a CMake list ("80;90a")."""
    raw = os.environ.get("CROSSSPEC_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", raw):
        if not item:
            continue
        arch = item.replace(".", "").removeprefix("sm_").removeprefix("compute_")
        if not re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?", arch):
            raise SystemExit(
                f"CROSSSPEC_CUDA_ARCHS: cannot read {item!r} in {raw!r}; "
                'use CMake architecture names such as "80;90a" or "8.0;9.0a"'
            )
        archs.append(arch)
    return ";".join(archs)


def max_jobs() -> int:
    value = os.environ.get("MAX_JOBS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"MAX_JOBS must be a positive integer, got {value!r}")
    return int(value)


def find_cmake() -> str:
    try:  # the PyPI `cmake` package (a build requirement) is recent enough for CUDA 13 and sm_90a
        import cmake

        path = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    path = shutil.which("cmake")
    if path is None:
        raise SystemExit("crossspec_kernels: building _C needs CMake >= 3.25 (pip install cmake)")
    return path


def find_ninja() -> str | None:
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def pybind11_cmake_dir() -> str:
    try:
        import pybind11
    except ImportError as error:
        raise SystemExit("crossspec_kernels: building _C needs pybind11 (pip install pybind11)") from error
    return pybind11.get_cmake_dir()


SKIP_CUDA = _env_flag("CROSSSPEC_SKIP_CUDA")
NVCC, NVCC_MISSING = (None, "") if SKIP_CUDA else find_nvcc()
BUILD_CUDA = not SKIP_CUDA and NVCC is not None


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only names the output."""

    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        output_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        if self.editable_mode:
            # Editable builds get a fresh temp dir each time; a fixed one keeps ninja incremental.
            tag = f"{sys.implementation.cache_tag}-{sys.platform}"
            build_dir = str(ROOT / "build" / f"cmake-editable-{tag}")
        else:
            build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_dir, exist_ok=True)

        archs = cuda_archs()
        configure = [
            find_cmake(),
            "-S",
            ext.source_dir,
            "-B",
            build_dir,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={NVCC}",
            f"-DCROSSSPEC_CUDA_ARCHS={archs}",
            f"-DCROSSSPEC_OUTPUT_DIR={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_cmake_dir()}",
        ]
        ninja = find_ninja()
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if ninja and not _cache_uses_other_generator(cache, "Ninja"):
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = max_jobs()
        print(f"crossspec_kernels: building _C with {NVCC} for archs {archs}, {jobs} job(s)", flush=True)
        subprocess.run(configure, check=True)
        subprocess.run([find_cmake(), "--build", build_dir, "--parallel", str(jobs)], check=True)


def _cache_uses_other_generator(cache: str, generator: str) -> bool:
    """An existing build dir configured with another generator cannot be switched in place."""
    if not os.path.isfile(cache):
        return False
    with open(cache, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("CMAKE_GENERATOR:"):
                return line.split("=", 1)[1].strip() != generator
    return False


class BuildPyWithNotice(build_py):
    """Emits the pure-Python warning once per build (setup.py itself runs several times per pip call)."""

    def run(self) -> None:
        if not BUILD_CUDA:
            reason = "CROSSSPEC_SKIP_CUDA is set" if SKIP_CUDA else NVCC_MISSING
            print(
                f"WARNING: crossspec_kernels: NOT building the CUDA extension crossspec_kernels._C ({reason}). "
                "Installing pure Python: the reference and Triton backends work, backend='cuda' raises. "
                "To build it, put nvcc on PATH (or set CUDA_HOME) and run "
                "`pip install --no-build-isolation -e .`.",
                file=sys.stderr,
                flush=True,
            )
        super().run()


setup(
    ext_modules=[CMakeExtension(EXTENSION_NAME, ROOT)] if BUILD_CUDA else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithNotice},
)
