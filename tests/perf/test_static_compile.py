"""Static compile check: every launcher-reachable kernel variant compiles for sm_80 and sm_90 with
no register spills, no stack and no local memory, and the common layout streams the logits with
16-byte loads. Runs on CPU: triton.compile needs only ptxas / cuobjdump (shipped in triton's wheel).

Every ``@triton.jit`` kernel the package launches is in the one registry ``perf.kernel_specs.SPECS``
(``test_every_launched_kernel_is_registered``). What CI compiles is ``variants.ci_variants`` of each
spec (the same set as ``python -m perf.static_report``), each for sm_80 and sm_90: 828 compiles in
all (776 before the KL kernels joined; ``python -m perf.static_report --full`` compiles the 19,120
of the cross-product). Measured 2026-12-06 (triton 3.9, 2 workers, a shared 2-core box at load
~15): 402 s CPU (user + sys), 34 min wall; the 52 KL compiles are 3 % of the compile time. For the
two cross-entropy row kernels (300 of them):

1. layout c16 ((N, C) logits, C % 16 == 0), every logits dtype (fp32/bf16/fp16) x every launch
   config (``launch.all_configs()``: BLOCK_C 128..4096 with its warps), flags all OFF, all ON, and
   all ON but SOFT_TARGET (soft and hard targets are alternative paths, each with its own worst case);
2. layout c16, every dtype, the largest config, each flag alone;
3. layouts odd (C % 16 != 0) and nd ((N, C, D), class stride D), every dtype, the largest config,
   the same OFF / ON / ON-but-soft flag sets.

The KL family's kernels (distillation for each divergence, token log-probs; ``perf/kl_specs.py``)
run the same row loop with the same configs: CI compiles their largest block in bf16 (every
divergence x the flag extremes on c16, the extremes on odd); the linear head's GEMM kernels their
bf16 all-flags variant (``ci_pick`` of each spec).

Why that set stands for what the launcher can choose: its choices are dtype x flags x config
(``config.config(C)`` only ever returns one of ``all_configs()``), and the JIT's specializations
(unit strides as constants, 16-divisible pointers / strides) differ only between the layouts.
Every dtype x config pair is compiled at both register extremes: flags OFF (the least code) and
every flag ON. Each flag only *adds* live values to the same loop (a weight vector, a target
vector, a tanh, an lse gradient); only SOFT_TARGET replaces a path (hence its own ON set). Live
state grows with logits per thread (BLOCK_C / (32 * num_warps): 4, 8, then 16 from BLOCK_C = 512
on), so the largest config is the worst one and is also compiled with each flag alone and on the
unspecialized layouts, the most register-hungry ones (no vector loads: one 64-bit address per
element). Registers are not strictly monotone in the flags (ptxas allocates in steps and trades
registers for occupancy): the full c16 cross-product (triton 3.9) peaks at 64 (fwd) / 80 (bwd)
registers against 64 / 79 in this set, though for single configs up to 16 above it (bwd
BLOCK_C=4096 on sm_80: 64 for weight+smoothing+softcap vs 48), all far below 255 (yet ptxas
can spill a few bytes long before 255: see the known gap below). The full cross-product
(2^flags x configs x dtypes x layouts x 2 archs = 5184 compiles for cross_entropy_bwd alone,
~20-40 min of CPU) is ``python -m perf.static_report --full``: run it after changing a kernel or
the launch policy.

Known gap (triton 3.9, full run): 23 cross_entropy_bwd variants on the unvectorized layouts (nd:
21, odd: 2; fp16 but one fp32; BLOCK_C >= 1024; mixed flag sets, e.g. fp16 nd HAS_DLSE at 4096
on sm_90) carry 4-28 bytes of spill at 64-80 registers. These are ptxas heuristics, not register
pressure: on sm_90 the same PTX without the ``--regAllocOptLevel=2`` triton 3.9 passes to ptxas 13
uses 78 registers and no stack; on sm_80 (ptxas 12.9) one 4-byte value goes through local memory
once per loop iteration. The c16 layout (the common case) has none.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from perf import static_report as sr  # noqa: E402
from perf import variants  # noqa: E402
from perf.kernel_specs import SPECS  # noqa: E402

pytestmark = pytest.mark.skipif(not (sr.nvidia_tool("ptxas") and sr.nvidia_tool("cuobjdump")),
                                reason="ptxas / cuobjdump not available")
ROW_FIELDS = {f.name for f in dataclasses.fields(sr.Row)}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> list[sr.Row]:
    """Rows of the CI set, compiled by the CLI in a subprocess: the test process runs under
    TRITON_INTERPRET=1, where @triton.jit gives interpreter functions that cannot be compiled."""
    out = tmp_path_factory.mktemp("static_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton_cache")  # fresh: CI compiles from scratch
    # Its own session: on a timeout the whole group goes, the compile workers included (killing the
    # CLI alone left its process pool compiling on).
    proc = subprocess.Popen([sys.executable, "-m", "perf.static_report", "--workers", "2", "--quiet",
                             "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"static report took over 1200 s (killed with its workers):\n{stdout}\n{stderr}")
    path = out / "static_report.json"
    assert path.exists(), f"static report crashed (rc={proc.returncode}):\n{stdout}\n{stderr}"
    rows = [sr.Row(**{k: v for k, v in r.items() if k in ROW_FIELDS}) for r in json.loads(path.read_text())]
    print(stdout)
    return rows


def test_every_ci_variant_is_compiled(report):
    expected = {(k.kernel, k.dtype, k.layout, "+".join(f for f, v in k.flags if v) or "-",
                 ",".join(f"{a}={b}" for a, b in k.config), arch)
                for spec in SPECS.values() for k in variants.ci_variants(spec) for arch in sr.ARCHS
                if spec.arch_ok(k, arch)}
    got = {(r.kernel, r.dtype, r.layout, r.flags, r.config, r.sm) for r in report}
    assert got == expected, f"missing {sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"


def test_logits_gemm_uses_wgmma_on_sm90(report):
    """The fused-epilogue logits GEMM issues warpgroup MMAs on sm_90 (tl.dot lowered to wgmma)."""
    rows = [r for r in report if r.kernel == "logits_gemm" and r.sm == 90]
    assert rows and all(r.wgmma == "yes" for r in rows), sr.table(rows)


def test_no_spills_no_stack(report):
    bad = [r for r in report if r.bad]
    assert not bad, (f"{len(bad)} of {len(report)} compiles fail, spill or use stack/local memory:\n"
                     + sr.table(bad) + "\n\nfull table:\n" + sr.table(report))


def test_common_layout_uses_16_byte_loads(report):
    """c16 layout: whenever a thread holds >= 16 bytes of a block (BLOCK_C / (32 * num_warps)
    logits), the streaming logits load must be 16 bytes wide (ld.global.v4.b32)."""
    width = {"fp32": 4, "bf16": 2, "fp16": 2}
    narrow = []
    for r in report:
        if r.layout != "c16" or r.error or r.ld16 == "n/a":
            continue
        cfg = dict(kv.split("=") for kv in r.config.split(","))
        if "BLOCK_C" in cfg and int(cfg["BLOCK_C"]) // (32 * int(cfg["num_warps"])) * width[r.dtype] >= 16:
            if r.ld16 != "yes":
                narrow.append(r)
    assert not narrow, "logits loads narrower than 16 bytes:\n" + sr.table(narrow)


@pytest.mark.parametrize("value", [
    pytest.param(1, id="int-1"), pytest.param(0, id="int-0"), pytest.param(32000, id="int-c16"),
    pytest.param(50257, id="int-odd"), pytest.param(-100, id="int-neg"), pytest.param(2**31, id="int64"),
    pytest.param(0.1, id="float"), pytest.param(True, id="bool"),
])
def test_specialize_matches_the_jit(value):
    """variants.specialize gives the JIT's own (type, divisibility) for a launch argument."""
    jit = pytest.importorskip("triton.runtime.jit")
    native = getattr(jit, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend
    ty, key = native(BaseBackend, value, False, True, True)[:2]
    assert variants.specialize(value) == (ty, key == "D")


def test_stream_load_widths_parse_llvm_ir(tmp_path):
    """Loads are matched to source lines through the IR's debug info (inlined helpers included)."""
    (tmp_path / "k.py").write_text("a\n    x = tl.load(x_row + cols)\n    w = tl.load(w_ptr + cols)\n")
    llir = f"""
  %1 = tail call {{ i32, i32, i32, i32 }} asm sideeffect "mov.u32 $0, $4;\\0A\\09@$9 ld.global.v4.b32 {{ $0, $1, $2, $3 }}, [ $8 + 0 ];", "=r"(ptr addrspace(1) %0) #8, !dbg !12
  %2 = tail call i16 asm sideeffect "ld.global.b16 {{ $0 }}, [ $1 + 0 ];", "=c,l"(ptr addrspace(1) %0) #8, !dbg !13
  %3 = load <2 x float>, ptr addrspace(1) %4, align 8, !dbg !14
!1 = !DIFile(filename: "k.py", directory: "{tmp_path}")
!6 = distinct !DISubprogram(name: "k", linkageName: "k", scope: !1, file: !1, line: 1)
!8 = distinct !DILexicalBlockFile(scope: !6, file: !1, discriminator: 0)
!11 = !DILocation(line: 1, column: 3, scope: !6)
!12 = !DILocation(line: 2, column: 9, scope: !6)
!13 = !DILocation(line: 2, column: 9, scope: !8, inlinedAt: !11)
!14 = !DILocation(line: 3, column: 9, scope: !6)
"""  # noqa: E501 (verbatim LLVM IR lines)
    assert sr.stream_load_widths(llir, "tl.load(x_row + cols") == [16, 2]
    assert sr.stream_load_widths(llir, "tl.load(w_ptr") == [8]
    assert sr.stream_load_widths(llir.replace("DILocation", "DINowhere"), "tl.load(x_row") is None


def test_local_traffic_counts_stl_ldl():
    sass = """
        /*0090*/                   STL.64 [R1+0x8], R4 ;
        /*00a0*/                   STL [R1], R2 ;
        /*00b0*/                   LDL.LU R4, [R1+0x4] ;
        /*00c0*/                   LDL.LU.128 R8, [R1+0x10] ;
        /*00d0*/                   LDG.E.128 R12, desc[UR4][R2.64] ;
    """
    assert sr.local_traffic(sass) == (12, 20)


def _launched_jit_kernels() -> set[str]:
    """Names of the ``@triton.jit`` functions the package launches (``kernel[grid](...)``)."""
    import ast

    jit, launched = set(), set()
    for path in (REPO / "xent_triton").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d)
                                                         for d in node.decorator_list):
                jit.add(node.name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                target = node.func.value
                launched.add(target.id if isinstance(target, ast.Name) else getattr(target, "attr", ""))
    return jit & launched


def test_every_launched_kernel_is_registered():
    """Each kernel the package launches has a spec in the one registry (so CI compiles it)."""
    registered = {spec.kernel.name for spec in SPECS.values()}
    launched = _launched_jit_kernels()
    assert launched, "no launched @triton.jit kernel found: the scan is broken"
    assert launched <= registered, f"not in perf.kernel_specs.SPECS: {sorted(launched - registered)}"
