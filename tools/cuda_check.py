#!/usr/bin/env python3
"""Compile-check the CUDA backend without a GPU, and record kernel resources.

Every csrc/cuda/*.cu is compiled to object code by nvcc, for sm_80 and sm_90
plus sm_100 and sm_120 when this nvcc supports them, against the installed
torch's headers and with the flags of the real CUDA build (setup.py); every
csrc/cuda/*.cpp (the host side: checks, dispatch, registration) is compiled
by the host compiler against the same headers plus the CUDA runtime's. ptxas
is asked for its resource usage (-Xptxas -v), which is parsed and written to
csrc/cuda/RESOURCE_REPORT.txt: registers, stack, spill stores/loads and
shared memory per kernel instantiation and architecture.

Fails (exit 1) on a compile error, on a compiler warning in our own sources,
and on any register spill (a spill is a performance bug that a GPU-less CI
cannot otherwise see; set CUDA_CHECK_ALLOW_SPILLS=1 to report spills as
warnings only, e.g. while trying a new toolkit). Exit 2: no nvcc.

CPU wheels of torch ship the c10/cuda headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h; tools/cuda_build_include/ provides it for
this check only.

Environment: NVCC (compiler path), CXX (host compiler, default c++),
CUDA_CHECK_ARCHS (e.g. "80,90"), CUDA_CHECK_JOBS (parallel compiles),
CUDA_CHECK_ALLOW_SPILLS=1.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
BUILD_INCLUDE = os.path.join(ROOT, "tools", "cuda_build_include")
OUT_DIR = os.path.join(ROOT, ".cuda-check-build")
REPORT = os.path.join(CUDA_DIR, "RESOURCE_REPORT.txt")

REQUIRED_ARCHS = ("80", "90")
OPTIONAL_ARCHS = ("100", "120")
# What the real build passes to nvcc besides torch's own defaults (setup.py's
# extra_compile_args["nvcc"]). --fmad=false keeps the coordinate arithmetic in
# IEEE expression order, so floor/ceil/border tests fall exactly as on the
# CPU and in the reference (nvcc would otherwise contract a*b+c into FMAs).
BUILD_FLAGS = ["-std=c++20", "-O3", "--fmad=false"]


def find_nvcc() -> Optional[str]:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def run(cmd: List[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def nvcc_version(nvcc: str) -> str:
    out = run([nvcc, "--version"])
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return f"nvcc {m.group(2)}" if m else out.strip().splitlines()[-1]


def cuda_includes(nvcc: str) -> List[str]:
    """The include directories nvcc itself uses (for the host compiler)."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    dirs = []
    for key in ("INCLUDES", "SYSTEM_INCLUDES"):
        m = re.search(rf'^#\$ {key}=(.*)$', out, re.M)
        if m:
            dirs += [d for d in re.findall(r'"?-I"?\s*"?([^"\s]+)"?', m.group(1))]
            dirs += [d for d in re.findall(r'"-isystem"\s+"([^"]+)"', m.group(1))]
    return [d for d in dirs if os.path.isdir(d)]


def choose_archs(nvcc: str) -> List[str]:
    wanted = os.environ.get("CUDA_CHECK_ARCHS")
    supported = set(re.findall(r"compute_(\d+)", run([nvcc, "--list-gpu-arch"])))
    if wanted:
        archs = [a.strip().replace("sm_", "") for a in wanted.split(",") if a.strip()]
        missing = [a for a in archs if a not in supported]
        if missing:
            sys.exit(f"cuda-check: CUDA_CHECK_ARCHS asks for sm_{', sm_'.join(missing)}, "
                     f"which {nvcc} does not support")
        return archs
    missing = [a for a in REQUIRED_ARCHS if a not in supported]
    if missing:
        sys.exit(f"cuda-check: {nvcc} cannot compile for sm_{', sm_'.join(missing)} "
                 "(required); use a newer CUDA toolkit")
    return list(REQUIRED_ARCHS) + [a for a in OPTIONAL_ARCHS if a in supported]


def torch_flags() -> Tuple[List[str], List[str], str]:
    """(flags for nvcc and the host compiler alike, nvcc-only flags, torch version)."""
    import torch
    import torch.utils.cpp_extension as ce

    includes = ce.include_paths()
    common = ["-I", os.path.join(ROOT, "csrc")]
    for inc in includes:
        common += ["-isystem", inc]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.isfile(os.path.join(inc, generated)) for inc in includes):
        common += ["-I", BUILD_INCLUDE]  # CPU wheel: our stand-in for the generated header
    # what torch's extension builder adds on its own
    common += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    nvcc_only = list(ce.COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"]
    return common, nvcc_only, torch.__version__


def check_setup_flags() -> None:
    setup = os.path.join(ROOT, "setup.py")
    if os.path.isfile(setup) and "--fmad=false" not in open(setup).read():
        print("WARNING: setup.py does not pass --fmad=false to nvcc: the real CUDA build "
              "would contract coordinate arithmetic into FMAs and differ from this check")


# ---------------------------------------------------------------- ptxas output


@dataclass
class Usage:
    source: str
    kernel: str  # demangled, shortened
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    callees: List[str] = field(default_factory=list)  # non-inlined functions with a frame

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(source: str, text: str) -> List[Usage]:
    usages: List[Usage] = []
    current: Optional[Usage] = None
    props_for: Optional[str] = None
    mangled_of: Dict[int, str] = {}
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = Usage(source, m.group(1), m.group(2).replace("sm_", ""))
            mangled_of[id(current)] = m.group(1)
            usages.append(current)
            props_for = None
            continue
        m = PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = FRAME.search(line)
        if m and current is not None:
            stack, st, ld = (int(v) for v in m.groups())
            if props_for == mangled_of[id(current)]:
                current.stack, current.spill_stores, current.spill_loads = stack, st, ld
            else:  # a non-inlined callee of the current entry
                current.callees.append(props_for or "?")
                current.stack = max(current.stack, stack)
                current.spill_stores += st
                current.spill_loads += ld
            continue
        m = USED.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            s = SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
    return usages


def demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


KERNEL_LABELS = {
    "AlignForwardParams": "roi_align forward",
    "AlignFootprintParams": "roi_align backward: ROI footprints",
    "AlignBackwardParams": "roi_align backward",
    "UnpoolForwardParams": "roi_unpool forward",
    "UnpoolBackwardParams": "roi_unpool backward",
}
TYPE_NAMES = {"c10::Half": "float16", "c10::BFloat16": "bfloat16", "float": "float32",
              "double": "float64"}


def label(demangled: str) -> Tuple[str, str, str]:
    """'void roi_ops::cuda::roi_ops_kernel<...AlignForwardParams<c10::Half, float> >(...)'
    -> ('roi_align forward', 'float16', 'float32')."""
    m = re.search(r"(\w+Params)<([^<>]*)>", demangled)
    if not m:
        return demangled, "", ""
    args = [a.strip() for a in m.group(2).split(",")]
    kind = KERNEL_LABELS.get(m.group(1), m.group(1))
    if "blend::" in demangled:
        kind = f"roi_unpool_blend {m.group(1).replace('Params', '')}"
    if len(args) == 1:
        return kind, "-", TYPE_NAMES.get(args[0], args[0])
    return kind, TYPE_NAMES.get(args[0], args[0]), TYPE_NAMES.get(args[1], args[1])


# ---------------------------------------------------------------- compile


def compile_cu(nvcc: str, src: str, archs: List[str], flags: List[str], threads: int):
    obj = os.path.join(OUT_DIR, os.path.basename(src) + ".o")
    cmd = [nvcc, "-c", src, "-o", obj, *BUILD_FLAGS, *flags, "-Xptxas", "-v",
           "--threads", str(threads)]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return compile_cmd(src, cmd)


def compile_cpp(src: str, flags: List[str]):
    obj = os.path.join(OUT_DIR, os.path.basename(src) + ".o")
    cxx = os.environ.get("CXX", "c++")
    # the host flags of setup.py's "cxx" list, plus warnings
    cmd = [cxx, "-c", src, "-o", obj, "-std=c++20", "-O3", "-fPIC", "-Wall", "-Wextra",
           "-ffp-contract=off", *flags]
    return compile_cmd(src, cmd)


def compile_cmd(src: str, cmd: List[str]):
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return src, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start, cmd


def own_warnings(text: str) -> List[str]:
    """Compiler warnings located in our sources (torch's headers are -isystem)."""
    out = []
    for line in text.splitlines():
        if "warning" in line.lower() and (f"{os.sep}csrc{os.sep}" in line or "csrc/" in line
                                          or "tools/" in line):
            out.append(line)
    return out


def write_report(usages: List[Usage], archs: List[str], header: List[str]) -> None:
    rows = sorted(usages, key=lambda u: (u.source, *label(u.kernel), int(u.arch)))
    lines = [f"# {h}" for h in header]
    lines.append("")
    lines.append("Registers per thread (S marks a spill; stack/smem columns below):")
    by_key: Dict[Tuple[str, str, str, str], Dict[str, Usage]] = {}
    for u in rows:
        by_key.setdefault((u.source, *label(u.kernel)), {})[u.arch] = u
    head = f"{'file':22} {'kernel':36} {'scalar':8} {'coord':7}" + "".join(
        f" {'sm_' + a:>7}" for a in archs)
    lines += [head, "-" * len(head)]
    for (src, kind, scalar, coord), per_arch in by_key.items():
        cells = []
        for a in archs:
            u = per_arch.get(a)
            cells.append(f" {'-' if u is None else str(u.registers) + ('S' if u.spills else ''):>7}")
        lines.append(f"{src:22} {kind:36} {scalar:8} {coord:7}" + "".join(cells))
    lines.append("")
    lines.append("Per kernel and architecture (bytes; ptxas -v):")
    head = (f"{'file':22} {'kernel':36} {'scalar':8} {'coord':7} {'arch':6} {'regs':>4} "
            f"{'stack':>5} {'spill_st':>8} {'spill_ld':>8} {'smem':>5}")
    lines += [head, "-" * len(head)]
    for u in rows:
        kind, scalar, coord = label(u.kernel)
        lines.append(f"{u.source:22} {kind:36} {scalar:8} {coord:7} {'sm_' + u.arch:6} "
                     f"{u.registers:>4} {u.stack:>5} {u.spill_stores:>8} {u.spill_loads:>8} "
                     f"{u.smem:>5}" + ("   <-- SPILL" if u.spills else ""))
    spills = [u for u in rows if u.spills]
    lines.append("")
    lines.append(f"Spills: {len(spills)} of {len(rows)} kernel builds"
                 + ("" if spills else " (none)"))
    with open(REPORT, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-report", action="store_true",
                        help=f"do not rewrite {os.path.relpath(REPORT, ROOT)}")
    args = parser.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda-check: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)",
              file=sys.stderr)
        return 2
    archs = choose_archs(nvcc)
    common, nvcc_only, torch_version = torch_flags()
    host_flags = list(common)
    for inc in cuda_includes(nvcc):
        host_flags += ["-isystem", inc]
    names = sorted(os.listdir(CUDA_DIR))
    cu = [os.path.join(CUDA_DIR, f) for f in names if f.endswith(".cu")]
    cpp = [os.path.join(CUDA_DIR, f) for f in names if f.endswith(".cpp")]
    if not cu:
        print(f"cuda-check: no .cu files under {CUDA_DIR}", file=sys.stderr)
        return 1
    os.makedirs(OUT_DIR, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = int(os.environ.get("CUDA_CHECK_JOBS", cores))
    threads = max(1, cores // max(1, min(jobs, len(cu))))
    version = nvcc_version(nvcc)
    print(f"cuda-check: {version}, torch {torch_version} headers; {len(cu)} .cu files x "
          f"sm_{', sm_'.join(archs)} ({threads} nvcc threads each), {len(cpp)} host .cpp "
          f"files; {jobs} parallel jobs")
    check_setup_flags()

    start = time.monotonic()
    tasks = [lambda s=s: compile_cu(nvcc, s, archs, common + nvcc_only, threads) for s in cu]
    tasks += [lambda s=s: compile_cpp(s, host_flags) for s in cpp]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda task: task(), tasks))
    total = time.monotonic() - start

    failed = False
    usages: List[Usage] = []
    for src, rc, text, seconds, cmd in results:
        name = os.path.basename(src)
        if rc != 0:
            failed = True
            print(f"cuda-check: FAILED to compile {name} ({seconds:.0f} s):\n"
                  f"  {' '.join(cmd)}\n{text}", file=sys.stderr)
            continue
        print(f"  compiled {name} in {seconds:.0f} s")
        for w in own_warnings(text):
            failed = True
            print(f"cuda-check: warning in our sources (fails the check): {w}", file=sys.stderr)
        usages += parse_ptxas(name, text)
    if failed:
        return 1

    names = demangle(sorted({u.kernel for u in usages}))
    for u in usages:
        u.kernel = names.get(u.kernel, u.kernel)
    missing = sorted({os.path.basename(s) for s in cu} - {u.source for u in usages})
    if missing:
        print(f"cuda-check: ptxas reported no kernels for {', '.join(missing)}",
              file=sys.stderr)
        return 1

    allow_spills = os.environ.get("CUDA_CHECK_ALLOW_SPILLS", "0") == "1"
    spills = [u for u in usages if u.spills]
    for u in spills:
        kind, scalar, coord = label(u.kernel)
        print(f"WARNING: spill: {kind} ({scalar}, {coord}) on sm_{u.arch}: "
              f"{u.spill_stores} bytes stored, {u.spill_loads} bytes loaded, "
              f"{u.registers} registers")
    if not args.no_report:
        write_report(usages, archs, [
            "CUDA kernel resources, generated by `make cuda-check` (tools/cuda_check.py): do not edit.",
            f"{version}; torch {torch_version} headers; "
            f"nvcc {' '.join(BUILD_FLAGS)} -Xptxas -v; archs sm_{', sm_'.join(archs)}.",
            "A spill fails the check (CUDA_CHECK_ALLOW_SPILLS=1 reports only).",
        ])
        print(f"  wrote {os.path.relpath(REPORT, ROOT)}")
    max_regs = max(u.registers for u in usages)
    print(f"cuda-check: {len(usages)} kernel builds, max {max_regs} registers, "
          f"{len(spills)} with spills, {total:.0f} s")
    if spills and not allow_spills:
        print("cuda-check: FAILED: register spills (see above; CUDA_CHECK_ALLOW_SPILLS=1 to "
              "accept while investigating)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
