"""Build the CPU kernels ahead of time: `python -m lmstack.kernels.build` (`make install` runs it).

Compiles the .cpp files of SOURCES into one library (torch.utils.cpp_extension, which needs
ninja and a C++ compiler) in lmstack/kernels/_build/, then writes BUILD_INFO.json:
the hash of the sources and the torch version the library was built against. The loader
(lmstack/kernels/__init__.py) only loads a library whose record matches the sources and torch
it sees, so an edited source or an upgraded torch falls back to PyTorch (with a warning)
instead of loading a stale or ABI-incompatible library.

A machine that cannot build (no compiler, no ninja) is not an error: the build prints one
warning and exits 0, and every op runs on the pure-PyTorch path.
`--strict` makes a failed build exit 1 (for tests of the build itself).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "quant_linear.cpp", HERE / "quant_linear_a8.cpp", HERE / "paged_attention.cpp",
           HERE / "dense_linear.cpp", HERE / "pool.h", HERE / "paged_attention.h",
           HERE / "decode_step.cpp", HERE / "quant_dequantize.cpp",
           HERE / "quant_codes.h")   # what the build record hashes
BUILD_DIR = HERE / "_build"
INFO = BUILD_DIR / "BUILD_INFO.json"
NAME = "lmstack_kernels"
# -march=native: the library is built on the machine that runs it (AVX2/FMA where the CPU has
# them; the source has scalar loops for CPUs without).
CFLAGS = ("-O3", "-march=native")
LDFLAGS: tuple[str, ...] = ()


def sources_hash() -> str:
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()


def library_path() -> Path:
    return BUILD_DIR / f"{NAME}.so"


def build(verbose: bool = False) -> Path:
    """Compile (ninja rebuilds only what changed) and record the build. Raises on failure."""
    import torch
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (torch.utils.cpp_extension builds with it)")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    INFO.unlink(missing_ok=True)   # no record while the library may be half-written
    cpp_extension.load(NAME, [str(s) for s in SOURCES if s.suffix == ".cpp"], extra_cflags=list(CFLAGS),
                       extra_ldflags=list(LDFLAGS),
                       build_directory=str(BUILD_DIR), is_python_module=False, verbose=verbose)
    lib = library_path()
    if not lib.exists():
        raise RuntimeError(f"the build finished but {lib} is missing")
    INFO.write_text(json.dumps({"sources_sha256": sources_hash(), "torch": torch.__version__,
                                "library": lib.name, "built": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return lib


def check_march(march: str) -> list[str]:
    """Compile every source for another CPU (-march=haswell: AVX2 without AVX-512; x86-64: the
    scalar loops) without building: the guarded paths this machine never runs still compile.
    Returns the failures' compiler messages (empty: all compiled). About 10 s a file."""
    import subprocess

    from torch.utils import cpp_extension
    inc = [f"-I{d}" for d in cpp_extension.include_paths()]
    failures = []
    for src in SOURCES:
        if src.suffix == ".cpp":
            r = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-w", "-O3", f"-march={march}", *inc, str(src)],
                               capture_output=True, text=True)
            if r.returncode:
                failures.append(f"{src.name}: {r.stderr[-2000:]}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmstack.kernels.build", description=__doc__.splitlines()[0])
    p.add_argument("--strict", action="store_true", help="exit 1 when the build fails")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    p.add_argument("--check-march", metavar="ARCH", help="only check that the sources compile for -march=ARCH "
                                                          "(haswell: the AVX2 paths; x86-64: the scalar ones)")
    args = p.parse_args(argv)
    if args.check_march:
        failures = check_march(args.check_march)
        print("\n".join(failures) or f"every source compiles for -march={args.check_march}")
        return 1 if failures else 0
    try:
        lib = build(args.verbose)
    except Exception as e:  # a machine without a toolchain keeps working, on the slower path
        msg = " ".join(str(e).split())[-600:]
        print(f"WARNING: lmstack CPU kernels were not built ({type(e).__name__}: {msg}); quantized layers "
              f"paged attention and decode linears will use the pure-PyTorch path", file=sys.stderr)
        return 1 if args.strict else 0
    print(f"lmstack CPU kernels built: {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
