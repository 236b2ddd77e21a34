"""Packaging: version, torch guard, sdist contents, and the sdist and a wheel
built from it installed as a user installs them.

The tests marked ``packaging`` build the sdist and a wheel and install them
into fresh virtual environments (no --system-site-packages) with
torch==2.13.0 and ``--no-build-isolation``; they take minutes (two builds of
the extension). Select them with ``-m packaging``, skip them with
``-m "not packaging"``. The rest take seconds.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.parser import Parser
from pathlib import Path

import pytest
import torch

import roi_ops
from roi_ops import _ops

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
EXTRAS = "adapter,demo,test"


def readme_install_lines() -> list[list[str]]:
    """The README's install commands (the ```bash block under "## Install"), each split as a shell would."""
    import shlex

    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Install\n.*?```bash\n(.*?)```", text, re.S | re.M).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_install_lines_name_what_a_fresh_venv_lacks():
    """torch brings setuptools only on Python >= 3.12, and a 3.10/3.11 venv has an older one: the README's first
    line names the build tools pyproject.toml requires, the second builds with --no-build-isolation."""
    first, second = readme_install_lines()
    assert first[:2] == ["pip", "install"] and TORCH_PIN in first
    requires = _pyproject()["build-system"]["requires"]
    assert "setuptools>=77" in requires and "setuptools>=77" in first and "ninja" in first
    assert second == ["pip", "install", "--no-build-isolation", "."]


def _run(cmd, cwd=None, env=None, timeout=1200, label=None) -> str:
    started = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    took = time.monotonic() - started
    if label:  # shown with -s (or -rA): where the minutes go
        print(f"[packaging] {label}: {took:.0f}s")
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"exit {proc.returncode} after {took:.0f}s: {' '.join(map(str, cmd))}\n{out}")
    return proc.stdout


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(MAX_JOBS="2", **extra)
    return env


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- version, metadata

def test_version_is_written_in_one_place():
    import importlib.metadata as md

    tree = ast.parse((ROOT / "roi_ops" / "_version.py").read_text())
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert roi_ops.__version__ == ast.literal_eval(assign.value)
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "roi_ops._version.__version__"}
    assert md.version("roi-ops") == roi_ops.__version__  # the installed (editable) metadata agrees
    # no other file spells a version of its own
    for path in [ROOT / "setup.py", ROOT / "roi_ops" / "__init__.py"]:
        assert not re.search(r"""version\s*=\s*["']\d""", path.read_text()), path


def _classifier_pythons() -> list[str]:
    prefix = "Programming Language :: Python :: 3."
    return [c.split(" :: ")[-1] for c in _pyproject()["project"]["classifiers"] if c.startswith(prefix)]


def _find_python(version: str):
    """An interpreter of `version` (on PATH, or one pyenv installed), or None."""
    candidates = [sys.executable, shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(Path(pyenv_root, "versions").glob(f"{version}.*/bin/python"))
    for exe in filter(None, candidates):
        probe = subprocess.run([str(exe), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return str(exe)
    return None


@pytest.mark.parametrize("version", _classifier_pythons())
def test_sources_compile_on_each_classified_python(version):
    """The classifiers name these Pythons: the package's sources must at least compile on each.
    (CI runs the package on the Python of .venv; torch wheels for the others are not at hand.)"""
    exe = _find_python(version)
    if exe is None:
        pytest.skip(f"python{version} is not installed here")
    files = sorted(str(p) for p in (ROOT / "roi_ops").rglob("*.py"))
    # compile() in memory: nothing is written into the checkout
    _run([exe, "-c", "import sys\nfor f in sys.argv[1:]: compile(open(f).read(), f, 'exec')", *files])


def _public_api():
    import inspect

    import roi_ops.roictrl_adapter

    for module in (roi_ops, roi_ops.reference, roi_ops.roictrl_adapter):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if inspect.isfunction(member):
                        yield f"{module.__name__}.{name}.{attr}", member
            elif inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj


def test_public_api_is_annotated_as_py_typed_claims():
    """roi_ops ships py.typed: type checkers then trust its annotations, so the public API must have them."""
    import inspect

    assert (ROOT / "roi_ops" / "py.typed").is_file()
    gaps, checked = set(), 0
    for qualname, fn in _public_api():
        checked += 1
        sig = inspect.signature(fn)
        gaps |= {f"{qualname}({p.name})" for p in sig.parameters.values()
                 if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty}
        if sig.return_annotation is inspect.Signature.empty and not qualname.endswith("__init__"):
            gaps.add(f"{qualname} -> return")
    assert checked > 20
    assert not gaps, sorted(gaps)


# ---------------------------------------------------------------- the torch guard

def test_torch_mismatch_rules():
    same = _ops._torch_mismatch("2.13.0+cpu", None, False, "2.13.0+cpu", None)
    assert same is None
    # a CPU-only build loads into any variant of its release
    assert _ops._torch_mismatch("2.13.0+cpu", None, False, "2.13.0+cu128", "12.8") is None
    assert _ops._torch_mismatch("2.13.0", None, False, "2.13.0+cpu", None) is None
    other = _ops._torch_mismatch("2.13.0+cpu", None, False, "2.13.1+cpu", None)
    assert other == "it was built against torch 2.13.0+cpu, but torch 2.13.1+cpu is installed"
    assert "2.14.0.dev20260101" in _ops._torch_mismatch("2.14.0.dev20260101", None, False, "2.14.0", None)
    no_cuda = _ops._torch_mismatch("2.13.0+cu128", "12.8", True, "2.13.0+cpu", None)
    assert "CUDA kernels" in no_cuda and "has no CUDA" in no_cuda
    assert "uses CUDA 13.0" in _ops._torch_mismatch("2.13.0+cu128", "12.8", True, "2.13.0+cu130", "13.0")
    assert _ops._torch_mismatch("2.13.0+cu126", "12.6", True, "2.13.0+cu128", "12.8") is None


def test_in_tree_build_records_its_torch():
    """`make build` (an editable install) writes roi_ops/_build_info.py for the guard."""
    from roi_ops import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert _build_info.WITH_CUDA == roi_ops.native_available("cuda")


def _package_copy(tmp_path: Path) -> Path:
    """A copy of the built package (with _C and _build_info.py) in tmp_path."""
    shutil.copytree(ROOT / "roi_ops", tmp_path / "roi_ops", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "roi_ops"


# .venv holds roi-ops as an editable install, whose import hook would find the
# checkout's roi_ops._C for the copy; drop it so the copy stands alone.
_STANDALONE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
               "if not getattr(f, '__module__', '').startswith('__editable__')]\n")


def test_import_under_another_torch_gives_one_clear_error(tmp_path):
    pkg = _package_copy(tmp_path)
    info = pkg / "_build_info.py"
    info.write_text(re.sub(r"TORCH_VERSION = .*", "TORCH_VERSION = '2.12.0+cpu'", info.read_text()))
    proc = subprocess.run([sys.executable, "-c", _STANDALONE + "import roi_ops"], cwd=tmp_path,
                          capture_output=True, text=True, env=_clean_env())
    assert proc.returncode != 0
    err = proc.stderr
    assert "undefined symbol" not in err and "circular import" not in err
    # one error, no chained ones
    assert re.findall(r"^\w+Error: ", err, re.M) == ["ImportError: "], err
    assert "During handling" not in err and "direct cause" not in err
    message = err[err.index("ImportError: "):]
    assert f"roi_ops {roi_ops.__version__} cannot load its compiled kernels" in message
    assert f"built against torch 2.12.0+cpu, but torch {torch.__version__} is installed" in message
    assert "pip install torch==2.12.0" in message  # which torch it needs
    assert "pip install --no-build-isolation" in message and "make build" in message  # how to rebuild
    # ... and the same copy with the true record loads its kernels
    info.write_text(re.sub(r"TORCH_VERSION = .*", f"TORCH_VERSION = {torch.__version__!r}", info.read_text()))
    out = _run([sys.executable, "-c", _STANDALONE + "import roi_ops; print(roi_ops.__file__, "
                "roi_ops.native_available('cpu'))"], cwd=tmp_path, env=_clean_env())
    assert out.split() == [str(pkg / "__init__.py"), "True"]


@pytest.mark.parametrize("build_info", ["absent", "other torch"])
def test_missing_extension_is_reported_as_not_built(tmp_path, build_info):
    """No _C: the fallback, with the true reason; a leftover _build_info.py
    (e.g. after `make clean`) naming another torch does not matter then."""
    pkg = _package_copy(tmp_path)
    for f in pkg.glob("_C*.so"):
        f.unlink()
    info = pkg / "_build_info.py"
    if build_info == "absent":
        info.unlink()
    else:
        info.write_text(re.sub(r"TORCH_VERSION = .*", "TORCH_VERSION = '2.12.0+cpu'", info.read_text()))
    code = _STANDALONE + textwrap.dedent("""
        import warnings, torch, roi_ops
        assert not roi_ops.native_available("cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            roi_ops.roi_align(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]]), 2)
        print(type(roi_ops.native_import_error()).__name__)
        print(*[str(w.message) for w in caught], sep="\\n")
    """)
    out = _run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env())
    kind, warning = out.splitlines()[:2]
    assert kind == "ModuleNotFoundError"
    assert "circular import" not in out
    assert f"roi_ops._C is not built: no compiled extension in {pkg}" in warning
    assert "using the pure-PyTorch implementation" in warning


# ---------------------------------------------------------------- sdist and wheel

@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, built from the checkout through setuptools' PEP 517 hook
    (what `python -m build --sdist` calls)."""
    out = tmp_path_factory.mktemp("sdist")
    name = _run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
                cwd=ROOT, env=_clean_env()).strip().splitlines()[-1]
    return out / name


def _expected_sdist_members() -> set[str]:
    files = {"PKG-INFO", "setup.cfg", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE",
             "CHANGELOG.md", "docs/spec.md", "roi_ops/py.typed"}
    files |= {f"roi_ops.egg-info/{n}" for n in
              ("PKG-INFO", "SOURCES.txt", "dependency_links.txt", "requires.txt", "top_level.txt")}
    if _pyproject()["project"].get("scripts"):
        files.add("roi_ops.egg-info/entry_points.txt")
    for pattern in ("*.cpp", "*.h", "*.cu", "*.cuh"):
        files |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob(pattern)}
    files |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "roi_ops").rglob("*.py")
              if "__pycache__" not in p.parts}
    files.discard("roi_ops/_build_info.py")
    return files


@pytest.mark.packaging
def test_sdist_holds_every_build_source_and_nothing_else(sdist):
    with tarfile.open(sdist) as tar:
        root = f"roi_ops-{roi_ops.__version__}/"
        members = {m.name[len(root):] for m in tar.getmembers() if m.isfile()}
        pkg_info = Parser().parsestr(tar.extractfile(root + "PKG-INFO").read().decode())
    missing, extra = _expected_sdist_members() - members, members - _expected_sdist_members()
    assert not missing and not extra, f"missing from the sdist: {sorted(missing)}; not wanted: {sorted(extra)}"
    assert pkg_info["Version"] == roi_ops.__version__
    # the sdist keeps a range that torch 2.13.0 satisfies, and says a build may change it
    torch_reqs = [r for r in pkg_info.get_all("Requires-Dist") if r.startswith("torch")]
    assert torch_reqs == ["torch>=2.4"]
    assert "requires-dist" in [d.lower() for d in pkg_info.get_all("Dynamic")]
    assert {"adapter", "demo", "test"} <= set(pkg_info.get_all("Provides-Extra"))


# --no-compile: no .pyc for all of torch up front (a third of its install time);
# what is imported gets compiled then.
PIP_INSTALL = ["-m", "pip", "install", "-q", "--no-compile"]


def _venv(path: Path, *packages: str) -> Path:
    """A fresh virtual environment (its own site-packages only) with `packages`."""
    _run([sys.executable, "-m", "venv", path], env=_clean_env(), label=f"{path.name}: venv")
    python = path / "bin" / "python"
    _run([python, *PIP_INSTALL, TORCH_PIN, *packages], env=_clean_env(), label=f"{path.name}: torch")
    return python


def _smoke(python: Path, workdir: Path) -> str:
    """Runs tests/packaging_smoke.py with the environment's own pytest, from a
    folder holding nothing of the checkout (the toy model, which the package does
    not ship, is named by ROI_OPS_TOY_MODEL for the demo's --toy-model)."""
    workdir.mkdir()
    shutil.copy(ROOT / "tests" / "packaging_smoke.py", workdir / "packaging_smoke.py")
    toy = ROOT / "benchmarks" / "instance_control" / "checkpoints"
    return _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "packaging_smoke.py"],
                cwd=workdir, env=_clean_env(MPLBACKEND="Agg", ROI_OPS_TOY_MODEL=str(toy)),
                label=f"{workdir.name}: smoke")


def _from_sdist_venv(sdist: Path, tmp: Path) -> str:
    """The README's install lines, as written, in a fresh venv of this Python, in the unpacked sdist."""
    venv = tmp / "venv-sdist"
    _run([sys.executable, "-m", "venv", venv], env=_clean_env(), label="venv-sdist: venv")
    python = venv / "bin" / "python"
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (source,) = (tmp / "unpacked").iterdir()
    for i, (pip, *args) in enumerate(readme_install_lines()):
        assert pip == "pip", args
        # -q --no-compile only quieten and speed up; --no-cache-dir: never a wheel built from an older sdist
        _run([python, "-m", "pip", *args, "-q", "--no-compile", "--no-cache-dir"], cwd=source, env=_clean_env(),
             label=f"venv-sdist: README line {i + 1}")
    # the extras the smoke file exercises, for the roi-ops just installed (no second build)
    _run([python, *PIP_INSTALL, f"roi-ops[{EXTRAS}]=={roi_ops.__version__}", TORCH_PIN], env=_clean_env(),
         label="venv-sdist: extras")
    return _smoke(python, tmp / "run-sdist")


def _wheel_venv(sdist: Path, tmp: Path) -> str:
    wheel_dir = tmp / "wheel"
    with ThreadPoolExecutor(1) as pool:
        # the wheel needs no compiler, headers or build tools: none are installed there
        venv = pool.submit(_venv, tmp / "venv-wheel")
        # meanwhile, a wheel built from the sdist (not from the checkout), against .venv's torch 2.13.0
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-cache-dir",
              "-w", wheel_dir, sdist], env=_clean_env(), label="wheel from the sdist")
        python = venv.result()
    (wheel,) = wheel_dir.glob("roi_ops-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = Parser().parsestr(zf.read(f"roi_ops-{roi_ops.__version__}.dist-info/METADATA").decode())
    assert {"roi_ops/_build_info.py", "roi_ops/py.typed"} <= names
    assert any(re.fullmatch(r"roi_ops/_C\..*\.so", n) for n in names), sorted(names)
    assert not [n for n in names if n.startswith(("csrc/", "tests/"))]
    release = torch.__version__.split("+")[0]
    assert [r for r in meta.get_all("Requires-Dist") if r.startswith("torch")] == [f"torch=={release}"]
    _run([python, *PIP_INSTALL, "--no-build-isolation", "--no-cache-dir",
          f"roi-ops[{EXTRAS}] @ {wheel.as_uri()}", TORCH_PIN], env=_clean_env(),
         label="venv-wheel: pip install the wheel + extras")
    report = _smoke(python, tmp / "run-wheel")
    _check_guard_in_installed_wheel(python, tmp)
    return report


def _check_guard_in_installed_wheel(python: Path, tmp: Path) -> None:
    """The installed wheel, told it was built against another torch, refuses with the one message."""
    info = Path(_run([python, "-c", "import roi_ops._build_info as b; print(b.__file__)"],
                     cwd=tmp, env=_clean_env()).strip())
    original = info.read_text()
    try:
        info.write_text(re.sub(r"TORCH_VERSION = .*", "TORCH_VERSION = '2.11.0+cpu'", original))
        proc = subprocess.run([python, "-c", "import roi_ops"], cwd=tmp, capture_output=True, text=True,
                              env=_clean_env())
        assert proc.returncode != 0 and re.findall(r"^\w+Error: ", proc.stderr, re.M) == ["ImportError: "], \
            proc.stderr
        assert "built against torch 2.11.0+cpu" in proc.stderr and "pip install torch==2.11.0" in proc.stderr
    finally:
        info.write_text(original)


@pytest.mark.packaging
def test_sdist_and_wheel_install_into_fresh_venvs(sdist, tmp_path):
    """sdist -> fresh venv (torch 2.13.0, --no-build-isolation) -> smoke; sdist ->
    wheel -> another fresh venv -> smoke. Both with the [adapter,demo,test]
    extras, which the smoke file exercises. The two run side by side: one
    compiles while the other installs."""
    with ThreadPoolExecutor(2) as pool:
        jobs = {"sdist": pool.submit(_from_sdist_venv, sdist, tmp_path),
                "wheel": pool.submit(_wheel_venv, sdist, tmp_path)}
        reports = {name: job.result() for name, job in jobs.items()}
    for name, report in reports.items():  # (a failure has raised already)
        assert re.search(r"\d+ passed", report) and "skipped" not in report, f"{name}: {report[-2000:]}"
