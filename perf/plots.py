"""PNG plots of a sweep against the vocabulary size C, one line per provider (matplotlib, Agg).

GPU: ``gpu_time.png`` (median ms per mode and dtype at the headline N, roofline floor dashed) and
``gpu_memory.png`` (peak extra GiB, forward + backward). CPU: ``cpu_memory.png`` and
``cpu_traffic.png`` (multiples of the logits' bytes; the roofline model dashed). Linear-head plots
carry a ``_linear`` suffix.
"""
from __future__ import annotations

import os

from perf.rows import HEADLINE_N, MODE_TITLES, GiB, number, order, title

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STYLES = ["-", "--", "-.", ":"]


def _ctick(c: int) -> str:
    return f"{c / 1000:.0f}k" if c >= 1000 else str(c)


def _shrink(path: str) -> None:
    """Re-save with a 64-colour palette (a third of the size; plots have few colours)."""
    try:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
    except Exception:  # noqa: BLE001 - Pillow missing: keep the full-colour file
        pass


def _specs(cuda: bool, modes: list[str]):
    if cuda:
        return [("time", "ms", "time (ms, median)", modes, False),
                ("memory", "peak_bytes", "peak extra memory (GiB)",
                 [m for m in modes if m == "fwdbwd"] or modes[:1], False)]
    return [("memory", "mem_x_logits", "peak extra memory ÷ logits bytes", modes, True),
            ("traffic", "measured_x_logits", "bytes moved ÷ logits bytes", modes, True)]


def plots(rows: list[dict], out_dir: str, cuda: bool) -> list[str]:
    """Write the PNGs of ``rows`` (sweep CSV rows) under ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    paths = []
    for kind in ("ce", "linear"):
        kr = [r for r in rows if r["kind"] == kind and r.get("status") == "ok"]
        if not kr:
            continue
        names = order(kr, kind)
        modes = [m for m in MODE_TITLES if any(r["mode"] == m for r in kr)]
        dts = sorted({r["dtype"] for r in kr})
        Ns = sorted({int(r["N"]) for r in kr})
        N = HEADLINE_N if HEADLINE_N in Ns else Ns[-1]
        Cs = sorted({int(r["C"]) for r in kr})
        for what, col, ylabel, pmodes, sharey in _specs(cuda, modes):
            size = (max(4.0 * len(pmodes) + 1.2, 10), 3.5 * len(dts) + 1.2)
            fig, axes = plt.subplots(len(dts), len(pmodes), figsize=size, squeeze=False, sharex=True,
                                     sharey=sharey)
            for i, dt in enumerate(dts):
                for j, mode in enumerate(pmodes):
                    ax = axes[i][j]
                    sel = [r for r in kr if r["dtype"] == dt and r["mode"] == mode and int(r["N"]) == N]
                    for k, p in enumerate(names):
                        pts = sorted((int(r["C"]), number(r.get(col))) for r in sel if r["provider"] == p)
                        pts = [(c, v / GiB if col == "peak_bytes" else v) for c, v in pts if v is not None]
                        if not pts:
                            continue
                        # later providers drawn smaller, so that coinciding lines stay visible
                        line, = ax.plot(*zip(*pts), marker=MARKERS[k % len(MARKERS)],
                                        ms=max(3.5, 9 - 1.5 * k), ls=STYLES[k % len(STYLES)],
                                        lw=max(1.0, 2.2 - 0.3 * k), label=title(p), alpha=0.85)
                        if not cuda and what == "traffic":
                            mp = sorted((int(r["C"]), number(r["model_bytes"]) / number(r["logits_bytes"]))
                                        for r in sel if r["provider"] == p and number(r.get("model_bytes")))
                            if mp:
                                ax.plot(*zip(*mp), ls="-", lw=7, color=line.get_color(), alpha=0.18)
                    if cuda and what == "time":
                        fl = sorted({(int(r["C"]),
                                      number(r.get("floor_ms_measured")) or number(r.get("floor_ms_spec")))
                                     for r in sel})
                        fl = [(c, v) for c, v in fl if v]
                        if fl:
                            ax.plot(*zip(*fl), ls="--", lw=1.5, color="black", label="roofline floor")
                    ax.set_xscale("log")
                    ax.set_xticks(Cs)
                    ax.set_xticklabels([_ctick(c) for c in Cs], fontsize=8, rotation=45)
                    ax.xaxis.set_minor_formatter(NullFormatter())
                    if cuda:  # times and GiB span decades: log; CPU multiples are small numbers: linear
                        ax.set_yscale("log")
                        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                        ax.yaxis.set_minor_formatter(NullFormatter())

                    ax.set_title(f"{MODE_TITLES[mode]}, {dt}" + (f", N={N}" if cuda else ""), fontsize=10)
                    ax.grid(True, which="major", alpha=0.35)
                    if i == len(dts) - 1:
                        ax.set_xlabel("vocabulary C (classes, log scale)")
                    if j == 0:
                        ax.set_ylabel(ylabel + (" (log)" if cuda else ""), fontsize=9)
            if not cuda:  # after all lines (shared y): from 0 to the largest multiple
                ys = [ln.get_ydata() for a in axes.flat for ln in a.get_lines()]
                top = max((max(y) for y in ys if len(y)), default=1)
                axes[0][0].set_ylim(0, top * 1.08)
            h, lab = axes[0][0].get_legend_handles_labels()
            if not cuda and what == "traffic":
                h.append(plt.Line2D([], [], lw=7, color="gray", alpha=0.3))
                lab.append("roofline model (xent_triton.roofline)")
            fig.legend(h, lab, loc="lower center", ncol=min(len(lab), 3 if len(pmodes) < 3 else 6),
                       frameon=False, fontsize=9)
            where = (f"GPU {kr[0]['device']}" if cuda else
                     f"measured on CPU at N={N} rows (multiples of N·C·B do not depend on N)"
                     + ("; ≈0: per-token only" if what == "memory" else ""))
            head = "cross-entropy" if kind == "ce" else "linear head + cross-entropy"
            fig.suptitle(f"{head}: {ylabel} — {where}\n"
                         f"torch {kr[0]['torch']}, triton {kr[0]['triton']}, {kr[0]['date']}, "
                         f"commit {kr[0]['commit']}", fontsize=10)
            fig.tight_layout(rect=(0, 0.1 if len(pmodes) < 3 else 0.06, 1, 0.97))
            name = f"{'gpu' if cuda else 'cpu'}_{what}{'' if kind == 'ce' else '_linear'}.png"
            path = os.path.join(out_dir, name)
            fig.savefig(path, dpi=80)
            plt.close(fig)
            _shrink(path)
            paths.append(path)
    return paths
