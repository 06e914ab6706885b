"""Static GPU resource report: compile every kernel variant for sm_80 / sm_90 with no GPU.

For each variant (``perf/variants.py``: kernel x logits dtype x flags x launch config x layout) of
every kernel of the registry ``perf.kernel_specs`` and each target, ``triton.compile`` builds the
cubin with triton's own ptxas (triton 3.9: CUDA 12.9 for sm_80, 13.x for sm_90; register counts
can differ by a few with other versions);
``cuobjdump --dump-resource-usage`` gives registers, stack, shared and local bytes; when stack or
local memory is used, the SASS's local stores / loads (STL / LDL) give the spill bytes. The LLVM
IR's line info tells which global load is the kernel's streaming (logits) load and how wide it is
(16 bytes = ``ld.global.v4.b32``).

Usage::

    python -m perf.static_report                 # the CI set (see tests/perf/test_static_compile.py)
    python -m perf.static_report --full          # the full cross-product (~0.3 s CPU a compile)
    python -m perf.static_report --out perf/out  # also writes static_report.{md,csv,json}

Exit status 1 when a variant spills, uses stack or local memory, or fails to compile.
TRITON_INTERPRET is removed from the environment (the report needs the real compiler). Compiles go
to an empty temporary Triton cache unless ``--cache-dir`` is given (so the timings are those of a
clean compile, as in CI).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

ARCHS = (80, 90)
COLUMNS = ("kernel", "dtype", "layout", "flags", "config", "sm", "regs", "stack", "local",
           "spill_st", "spill_ld", "shared", "ld_bytes", "ld16", "wgmma", "seconds", "error")


@dataclasses.dataclass
class Row:
    """One compiled variant for one target."""
    kernel: str
    dtype: str
    layout: str
    flags: str
    config: str
    sm: int
    regs: int = -1
    stack: int = -1
    local: int = -1
    spill_st: int = 0
    spill_ld: int = 0
    shared: int = -1
    ld_bytes: int = -1  # narrowest streaming (logits) load, bytes per thread per instruction
    ld16: str = "n/a"
    wgmma: str = "n/a"  # sm_90 only: does the PTX issue warpgroup MMAs ("yes" / "no")
    seconds: float = 0.0
    error: str = ""

    @property
    def bad(self) -> bool:
        return bool(self.error) or self.stack > 0 or self.local > 0 or self.spill_st > 0 or self.spill_ld > 0


def nvidia_tool(name: str) -> Optional[str]:
    """Path of ptxas / cuobjdump: triton's bundled copy, TRITON_<NAME>_PATH, or PATH."""
    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if env and os.path.isfile(env):
        return env
    try:
        import triton.backends.nvidia as nv
        path = pathlib.Path(nv.__file__).parent / "bin" / name
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which(name)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_LOCAL_OP = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)")
_MD = re.compile(r"^(![0-9]+) = (?:distinct )?(.*)$", re.M)
_DBG = re.compile(r"!dbg (![0-9]+)")
_DILOC = re.compile(r"!DILocation\(line: (\d+), column: \d+, scope: (![0-9]+)")
_SCOPE_FILE = re.compile(r"\bfile: (![0-9]+)")
_DIFILE = re.compile(r'!DIFile\(filename: "([^"]*)", directory: "([^"]*)"')
_LLVM_LOAD = re.compile(
    r"= load (?:volatile )?(?:<(\d+) x )?(i8|i16|i32|i64|half|bfloat|float|double)>?, ptr addrspace\(1\)")
_LLVM_BYTES = {"i8": 1, "i16": 2, "half": 2, "bfloat": 2, "i32": 4, "float": 4, "i64": 8, "double": 8}
_LDG = re.compile(r"\bld\.global((?:\.[\w:]+)*)")
_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4, "u32": 4,
          "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8, "b128": 16}


def resource_usage(cubin: bytes, name: str) -> tuple[int, int, int, int]:
    """(regs, stack, shared, local) of kernel ``name`` from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    block = out.split(f"Function {name}:", 1)[-1]
    m = _RES.search(block)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    return tuple(int(v) for v in m.groups())  # type: ignore[return-value]


def spill_bytes(cubin: bytes) -> tuple[int, int]:
    """(bytes stored, bytes loaded) by the local-memory instructions (STL / LDL: spills, or a
    local array) of the binary's SASS; read only when stack/local > 0. Same count as ptxas -v's
    "bytes spill stores / loads", but of the very binary triton built (ptxas flags included)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", f.name],
                              check=True, capture_output=True, text=True).stdout
    return local_traffic(sass)


def local_traffic(sass: str) -> tuple[int, int]:
    """(bytes, bytes) stored / loaded by the STL / LDL instructions of a SASS listing."""
    total = {"STL": 0, "LDL": 0}
    for op, mods in _LOCAL_OP.findall(sass):
        bits = next((int(m.lstrip("SU")) for m in mods.split(".") if re.fullmatch(r"[SU]?\d+", m)), 32)
        total[op] += bits // 8
    return total["STL"], total["LDL"]


def stream_load_widths(llir: str, marker: str) -> Optional[list[int]]:
    """Byte width of every global load whose debug location is a source line containing ``marker``
    (inlined helpers included), read from the LLVM IR: each load is one inline-asm ``ld.global``
    (or an LLVM ``load`` from addrspace(1)) with an exact ``!dbg`` line. (The PTX's ``.loc`` lines
    are not exact: LLVM numbers the lines of a multi-line inline asm block line+1, line+2, ...)
    None when the IR has no line info (TRITON_DISABLE_LINE_INFO=1)."""
    md = dict(_MD.findall(llir))
    if not any(v.startswith("!DILocation") for v in md.values()):
        return None
    sources: dict[str, list[str]] = {}
    widths = []
    for text in llir.splitlines():
        width = _load_width(text)
        dbg = _DBG.search(text)
        if width is None or not dbg or dbg.group(1) not in md:
            continue
        loc = _DILOC.search(md[dbg.group(1)])
        file_ref = _SCOPE_FILE.search(md.get(loc.group(2), "")) if loc else None
        f = _DIFILE.search(md.get(file_ref.group(1), "")) if file_ref else None
        if not f:
            continue
        path = os.path.join(f.group(2), f.group(1))
        if path not in sources:
            sources[path] = pathlib.Path(path).read_text().splitlines() if os.path.isfile(path) else []
        line = int(loc.group(1))
        if 0 < line <= len(sources[path]) and marker in sources[path][line - 1]:
            widths.append(width)
    return widths


def _load_width(text: str) -> Optional[int]:
    """Bytes loaded per thread by one LLVM IR line, if it is a global load."""
    if "asm" in text and (m := _LDG.search(text)):
        parts = m.group(1).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        return vec * next((_WIDTH[p] for p in parts if p in _WIDTH), 0)
    if (m := _LLVM_LOAD.search(text)):
        n, ty = int(m.group(1) or 1), m.group(2)
        return n * _LLVM_BYTES.get(ty, 0)
    return None


def compile_one(key, arch: int) -> Row:
    """Compile one variant for sm_<arch> and measure it (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from perf import variants
    from perf.kernel_specs import SPECS

    row = Row(key.kernel, key.dtype, key.layout, "+".join(k for k, v in key.flags if v) or "-",
              ",".join(f"{k}={v}" for k, v in key.config), arch)
    t0 = time.perf_counter()
    try:
        v = variants.build(SPECS[key.kernel], key)
        src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v.options))
        name = compiled.metadata.name
        row.regs, row.stack, row.shared, row.local = resource_usage(compiled.asm["cubin"], name)
        row.shared = max(row.shared, int(compiled.metadata.shared))  # dynamic (pipelined operands)
        if row.stack > 0 or row.local > 0:
            row.spill_st, row.spill_ld = spill_bytes(compiled.asm["cubin"])
        if arch >= 90:
            row.wgmma = "yes" if "wgmma.mma_async" in compiled.asm["ptx"] else "no"
        marker = SPECS[key.kernel].stream_load
        if marker:
            widths = stream_load_widths(compiled.asm["llir"], marker)
            if widths is not None:
                row.ld_bytes = min(widths) if widths else 0
                row.ld16 = "yes" if widths and row.ld_bytes >= 16 else "no"
    except Exception as e:  # reported as a failing row, with the root cause's message
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        lines = [t.strip() for t in str(root).strip().splitlines() if t.strip()] or [""]
        msg = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        row.error = f"{type(root).__name__}: {msg}"[:400]
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def _init_worker(cache_dir: Optional[str]) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    import warnings
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def run(keys: list, archs=ARCHS, workers: int = 2, cache_dir: Optional[str] = None,
        progress: bool = False) -> list[Row]:
    """Compile every (variant, arch) in a pool of ``workers`` fresh processes; rows in input order."""
    from perf.kernel_specs import SPECS
    jobs = [(k, a) for k in keys for a in archs if SPECS[k.kernel].arch_ok(k, a)]
    t0, rows = time.perf_counter(), []

    def note(row: Row) -> None:
        rows.append(row)
        if progress and len(rows) % max(1, len(jobs) // 10) == 0:
            print(f"  {len(rows)}/{len(jobs)} compiled, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    if workers <= 1:
        _init_worker(cache_dir)
        for k, a in jobs:
            note(compile_one(k, a))
        return rows
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that already ran MLIR
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(cache_dir,)) as pool:
        for row in pool.map(compile_one, *zip(*jobs), chunksize=4):
            note(row)
    return rows


def select(full: bool, kernels: Optional[list[str]] = None, layouts: Optional[list[str]] = None) -> list:
    """Variant keys: the CI set, or the full cross-product, optionally filtered."""
    from perf import variants
    from perf.kernel_specs import SPECS
    keys = []
    for name, spec in SPECS.items():
        if kernels and name not in kernels:
            continue
        gen = variants.full_variants(spec) if full else variants.ci_variants(spec)
        keys += [k for k in gen if not layouts or k.layout in layouts]
    return keys


def table(rows: list[Row], markdown: bool = False) -> str:
    """All rows as an aligned text table (or a markdown table)."""
    cells = [list(COLUMNS)] + [[str(getattr(r, c)) for c in COLUMNS] for r in rows]
    if markdown:
        out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in cells[1:]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells)


def summary(rows: list[Row]) -> str:
    """Per kernel x dtype x layout: variants, max registers, worst spill/stack, 16-byte loads."""
    order: dict[str, int] = {}
    for r in rows:
        for v in (r.kernel, r.layout, r.dtype):
            order.setdefault(v, len(order))
    groups: dict[tuple, list[Row]] = {}
    for r in sorted(rows, key=lambda r: (order[r.kernel], order[r.layout], order[r.dtype])):
        groups.setdefault((r.kernel, r.dtype, r.layout), []).append(r)
    out = [f"{'kernel':20} {'dtype':5} {'layout':6} {'n':>4} {'max_regs':>8} {'stack':>5} {'spill':>5} "
           f"{'errors':>6}  16B logits loads (configs without)"]
    for (kernel, dtype, layout), rs in groups.items():
        ok = [r for r in rs if not r.error]
        no16 = sorted({r.config for r in ok if r.ld16 == "no"})
        ld = "n/a" if all(r.ld16 == "n/a" for r in ok) else ("yes" if not no16 else "no: " + "; ".join(no16))
        regs = max((r.regs for r in ok), default=-1)
        out.append(f"{kernel:20} {dtype:5} {layout:6} {len(rs):4d} {regs:8d} "
                   f"{max((r.stack for r in ok), default=-1):5d} "
                   f"{max((r.spill_st + r.spill_ld for r in ok), default=-1):5d} "
                   f"{len(rs) - len(ok):6d}  {ld}")
    return "\n".join(out)


def write(rows: list[Row], out: pathlib.Path, header: str) -> None:
    """static_report.md (summary + table), .csv and .json under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_report.md").write_text(
        f"# Static resource report\n\n{header}\n\n```\n{summary(rows)}\n```\n\n{table(rows, True)}\n")
    with open(out / "static_report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([[getattr(r, c) for c in COLUMNS] for r in rows])
    (out / "static_report.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the full cross-product (default: the CI set)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    p.add_argument("--kernels", nargs="+", help="only these specs (names in kernel_specs.SPECS)")
    p.add_argument("--layouts", nargs="+", help="only these layouts (c16, odd, nd)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--cache-dir", help="Triton cache to reuse (default: a fresh temporary one)")
    p.add_argument("--out", type=pathlib.Path, help="write static_report.{md,csv,json} here")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (here and in the workers)
    for tool in ("ptxas", "cuobjdump"):
        if not nvidia_tool(tool):
            print(f"{tool} not found (triton's nvidia backend ships it)", file=sys.stderr)
            return 2
    keys = select(a.full, a.kernels, a.layouts)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as fresh:
        rows = run(keys, a.arch, a.workers, a.cache_dir or fresh, progress=not a.quiet)
    import triton
    header = (f"{len(rows)} compiles ({len(keys)} variants x sm_{'/sm_'.join(map(str, a.arch))}), "
              f"{'full cross-product' if a.full else 'CI set'}, triton {triton.__version__}, "
              f"{a.workers} workers, {time.perf_counter() - t0:.0f} s")
    if not a.quiet:
        print(table(rows) + "\n")
    print(summary(rows) + "\n\n" + header)
    bad = [r for r in rows if r.bad]
    for r in bad:
        print(f"BAD: {r.kernel} {r.dtype} {r.layout} flags={r.flags} {r.config} sm_{r.sm}: regs={r.regs} "
              f"stack={r.stack} local={r.local} spill={r.spill_st}/{r.spill_ld} {r.error}")
    if a.out:
        write(rows, a.out, header)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
