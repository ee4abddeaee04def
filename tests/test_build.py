"""Build and packaging: lazy loading of the extension, what the compiled module reports, the CLI.

Both sides of the extension are exercised on every machine: tests marked ``needs_extension`` use the
real ``crossspec_kernels._C`` (built wherever nvcc was found, CI included), and the missing-extension
path is simulated by hiding the module (``sys.modules[name] = None``) in-process and in subprocesses.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import crossspec_kernels
from crossspec_kernels import _ext
from crossspec_kernels.ops._dispatch import pick_backend

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses must import the same crossspec_kernels as this process (source tree or site-packages).
PACKAGE_PARENT = str(Path(crossspec_kernels.__file__).resolve().parents[1])
DEFAULT_ARCHS = "80;90a"
VERIFY_KEYWORDS = (
    "target_logits",
    "logits_dtype",
    "logits_stride_batch",
    "logits_stride_slot",
    "draft_probs",
    "probs_dtype",
    "probs_stride_batch",
    "probs_stride_slot",
    "draft_tokens",
    "parents",
    "temperature",
    "seed",
    "offset",
    "batch",
    "num_nodes",
    "vocab",
    "next_child",
    "emitted",
    "tokens",
    "num_accepted",
    "path",
    "stream",
)
HIDE_EXTENSION = "import sys; sys.modules['crossspec_kernels._C'] = None\n"

needs_extension = pytest.mark.skipif(
    not _ext.is_available(), reason="crossspec_kernels._C not built (installed without nvcc)"
)


def subprocess_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": PACKAGE_PARENT + (os.pathsep + path if path else "")}


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "crossspec"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "crossspec_kernels.cli"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


def without_gpu() -> bool:
    return not torch.cuda.is_available() and not glob.glob("/dev/nvidia[0-9]*")


@pytest.fixture
def fresh_ext_cache():
    _ext.clear_cache()
    yield
    _ext.clear_cache()


# ---- (a) the package never loads the extension at import --------------------------------------


def test_import_does_not_load_extension():
    out = run_python(
        "import sys, crossspec_kernels\n"
        "print('crossspec_kernels._C' in sys.modules, 'crossspec_kernels._ext' in sys.modules)"
    )
    assert out.stdout.split() == ["False", "False"]


def test_package_works_with_extension_hidden():
    out = run_python(
        HIDE_EXTENSION + "import torch, crossspec_kernels\n"
        "from crossspec_kernels import _ext\n"
        "logits = torch.zeros(1, 3, 8); logits[0, :, 5] = 1.0\n"
        "res = crossspec_kernels.verify(logits, torch.tensor([[5, 2]]), backend='reference')\n"
        "print(res.num_accepted.tolist(), res.tokens.tolist(), _ext.is_available())\n"
        "try:\n"
        "    _ext.get_module()\n"
        "except RuntimeError as error:\n"
        "    print('RAISED', error)\n"
    )
    lines = out.stdout.splitlines()
    # Greedy: draft 5 equals the argmax and is accepted, draft 2 is not; the correction is 5.
    assert lines[0] == "[1] [[5, 5, -1]] False"
    assert lines[1].startswith(
        "RAISED crossspec_kernels: the CUDA extension crossspec_kernels._C was not built"
    )


# ---- (c) a missing or broken extension raises with build instructions ------------------------


def test_get_module_without_extension_says_how_to_build(monkeypatch, fresh_ext_cache):
    monkeypatch.setitem(sys.modules, "crossspec_kernels._C", None)
    assert _ext.is_available() is False
    with pytest.raises(RuntimeError, match=r"crossspec_kernels\._C was not built") as info:
        _ext.get_module()
    message = str(info.value)
    for needle in (
        "nvcc",
        "CROSSSPEC_SKIP_CUDA=1",
        "pip install --no-build-isolation -e .",
        "CROSSSPEC_CUDA_ARCHS",
    ):
        assert needle in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_cuda_backend_without_extension_raises(monkeypatch, fresh_ext_cache):
    monkeypatch.setitem(sys.modules, "crossspec_kernels._C", None)
    with pytest.raises(RuntimeError, match=r"was not built.*pip install --no-build-isolation -e \."):
        pick_backend("verify", "cuda", torch.device("cuda"), torch.float32)


def test_broken_extension_reports_the_load_error(monkeypatch, fresh_ext_cache):
    def fail(name):
        raise ImportError(f"{name}: undefined symbol: cudaLaunchKernel_ptsz")

    monkeypatch.setattr(_ext, "importlib", SimpleNamespace(import_module=fail))
    with pytest.raises(RuntimeError, match=r"exists but failed to load .*undefined symbol"):
        _ext.get_module()
    assert _ext.is_available() is False


def test_get_module_is_cached(monkeypatch, fresh_ext_cache):
    calls = []
    fake = SimpleNamespace(cuda_archs=lambda: DEFAULT_ARCHS)

    def load(name):
        calls.append(name)
        return fake

    monkeypatch.setattr(_ext, "importlib", SimpleNamespace(import_module=load))
    assert _ext.get_module() is fake
    assert _ext.get_module() is fake
    assert _ext.is_available() is True
    assert calls == ["crossspec_kernels._C"]


# ---- (b) the compiled module ------------------------------------------------------------------


@needs_extension
def test_extension_reports_compiled_archs():
    archs = _ext.get_module().cuda_archs().split(";")
    requested = os.environ.get("CROSSSPEC_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")
    assert archs == [a for a in requested if a], f"built for {archs}, asked for {requested}"
    if "CROSSSPEC_CUDA_ARCHS" not in os.environ:
        assert "80" in archs and "90a" in archs


@needs_extension
def test_extension_cuda_version_matches_nvcc():
    version = _ext.get_module().cuda_version()
    assert isinstance(version, int) and 11000 <= version < 100000
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    release = re.search(
        r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    )
    assert release is not None
    assert (version // 1000, version % 1000 // 10) == (int(release[1]), int(release[2]))


@needs_extension
def test_extension_device_count_never_raises():
    count = _ext.get_module().device_count()
    assert isinstance(count, int) and count >= 0
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count()
    elif without_gpu():
        assert count == 0


@needs_extension
def test_extension_verify_takes_keyword_arguments_only():
    verify = _ext.get_module().verify
    for keyword in VERIFY_KEYWORDS:
        assert re.search(rf"\b{keyword}:", verify.__doc__), f"verify has no keyword {keyword!r}"
    with pytest.raises(TypeError):
        verify(*range(len(VERIFY_KEYWORDS)))  # positional: refused
    with pytest.raises(TypeError):
        verify(target_logits=0)  # required keywords missing


@needs_extension
def test_extension_verify_rejects_unknown_dtype_code():
    arguments = dict.fromkeys(VERIFY_KEYWORDS, 0) | {
        "batch": 1,
        "num_nodes": 1,
        "vocab": 8,
        "logits_dtype": 3,
    }
    with pytest.raises(ValueError, match=r"logits_dtype must be a dtype code 0 \(float32\).*got 3"):
        _ext.get_module().verify(**arguments)
    arguments |= {"logits_dtype": 0, "probs_dtype": -1}
    with pytest.raises(ValueError, match=r"probs_dtype must be a dtype code .*got -1"):
        _ext.get_module().verify(**arguments)


@needs_extension
@pytest.mark.skipif(not without_gpu(), reason="launching with null pointers is only safe without a GPU")
def test_extension_verify_raises_cuda_error_without_gpu():
    # No device or driver: the launch fails and the binding must raise, naming the op, not crash.
    arguments = dict.fromkeys(VERIFY_KEYWORDS, 0) | {"batch": 1, "num_nodes": 1, "vocab": 8}
    with pytest.raises(RuntimeError, match=r"^crossspec_kernels\._C\.verify: \S"):
        _ext.get_module().verify(**arguments)


# ---- (d) the console script --------------------------------------------------------------------


def test_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts", name="crossspec")
    assert [ep.value for ep in scripts] == ["crossspec_kernels.cli:main"]


def test_cli_info():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(rf"^torch\s+{re.escape(torch.__version__)}", out, re.M)
    assert re.search(r"^verify on cpu tensors\s+(reference|triton)$", out, re.M)
    built = re.search(r"^_C extension\s+(built|not built)", out, re.M)
    assert built is not None
    assert (built[1] == "built") == _ext.is_available()


# ---- docs and CI agree ---------------------------------------------------------------------------


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in readme.splitlines() if "pytest" in line and line.startswith("bash ")]
    assert commands, "README.md must show the test command (a line starting with `bash ` that runs pytest)"
    for command in commands:
        assert command in (line.strip() for line in ci), f".ci/run does not run README's {command!r}"


def test_readme_code_imports_what_exists():
    """Every import in README.md's Python blocks names something the package (and transformers) has."""
    import ast

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    imports = []
    for block in blocks:
        for node in ast.parse(block).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.append(ast.unparse(node))
    assert any("crossspec_kernels.runtime" in line for line in imports)
    namespace: dict = {}
    for line in imports:
        exec(line, namespace)  # raises ImportError for a name the docs promise but the code lacks
