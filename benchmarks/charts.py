#!/usr/bin/env python3
"""PNG charts of a benchmarks/run.py result (matplotlib, the project's `bench` extra).

    .venv/bin/python benchmarks/charts.py [RESULTS.json] [OUTDIR]

run.py calls write_charts() itself after a run; this command redraws the
charts from a saved results.json (default benchmarks/results/results.json,
written next to it). Three charts:

  ratios.png      per sandbox and workload, sandboxed / bare (median of the
                  per-pair ratios, whiskers p10-p90), log scale; and W0's
                  spawn overhead in ms
  throughput.png  W1 and W2 executions per second against concurrency
  scaling.png     the supervisor's memory and CPU per sandbox against the
                  number of sandboxes held open at once
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = {
    "zviz": "#1f77b4", "zviz_monitor": "#17becf", "bwrap": "#2ca02c", "firejail": "#ff7f0e",
    "runsc": "#d62728", "sandlock": "#9467bd", "bare": "#555555", "bare_monitor_loaded": "#bcbd22",
}



def _per_n_axis(ax, n: list, xlabel: str, ylabel: str, title: str) -> None:
    """A log-x axis over N sandboxes, from 0 up, labelled and with a legend."""
    ax.set_xscale("log")
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)

def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def _subtitle(results: dict) -> str:
    m = results.get("meta", {})
    return (f"{m.get('when', '?')} - kernel {m.get('kernel', '?')}, {m.get('cpus', '?')} CPUs, "
            f"zviz {m.get('zviz', '?')} ({m.get('git', '?')}){' - quick run' if m.get('quick') else ''}")


def _short(r: dict) -> str:
    return r.get("short") or r["label"]


def _log_ticks(ax, axis: str, lo: float, hi: float) -> None:  # type: ignore[no-untyped-def]
    steps = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if hi / lo < 300 or axis == "y" else \
        (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000)
    ticks = [t for t in steps if lo <= t <= hi]
    from matplotlib.ticker import NullFormatter

    if axis == "y":
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())


def ratios_chart(results: dict, path: Path) -> Path | None:
    rows = [r for r in results.get("comparison", {}).get("rows", [])
            if any(r.get(w) for w in ("W0", "W1", "W2", "W3", "W4"))]
    if not rows:
        return None
    plt = _plt()
    wls = ["W0", "W1", "W2", "W3", "W4"]
    names = {"W0": "W0 /bin/true\n(wall)", "W1": "W1 print(1)\n(wall)", "W2": "W2 agent snippet\n(wall)",
             "W3": "W3 syscall loop\n(its us/iter)", "W4": "W4 tree PSS\n(peak, MB)"}
    fig, (ax, ax0) = plt.subplots(1, 2, figsize=(15, 6.2), gridspec_kw={"width_ratios": [3.3, 1.2]})
    n = len(rows)
    width = 0.84 / n
    top = 1.0
    for i, r in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, w in enumerate(wls):
            c = r.get(w)
            if not c:
                continue
            xs.append(j - 0.42 + width * (i + 0.5))
            ys.append(c["ratio"])
            lo.append(max(c["ratio"] - c["p10"], 0))
            hi.append(max(c["p90"] - c["ratio"], 0))
        color = COLORS.get(r["key"], None)
        ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=2, label=_short(r), color=color,
               error_kw={"elinewidth": 0.8, "alpha": 0.6})
        for x, y, h in zip(xs, ys, hi):
            ax.text(x, (y + h) * 1.05, f"{y:.2f}" if y < 9.95 else f"{y:.0f}", ha="center", va="bottom", fontsize=7,
                    rotation=90)
            top = max(top, y + h)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylim(0.5, top * 2.5)
    _log_ticks(ax, "y", 0.5, top * 2.5)
    ax.set_xticks(range(len(wls)), [names[w] for w in wls])
    ax.set_ylabel("sandboxed / bare  (log scale; 1 = no overhead)")
    ax.set_title("Ratio to the same command run bare, interleaved in the same run\n"
                 "(bar: median of the per-pair ratios; whiskers: p10-p90)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=min(n, 6), frameon=False)

    # W0 overhead in ms
    r0 = [r for r in rows if r.get("W0")]
    ys = [max(r["W0"]["diff"], 1e-3) for r in r0]
    ax0.barh(range(len(r0)), ys, color=[COLORS.get(r["key"]) for r in r0])
    for k, (r, y) in enumerate(zip(r0, ys)):
        ax0.text(y * 1.1, k, f"+{r['W0']['diff']:.2f} ms", va="center", fontsize=8)
    ax0.set_yticks(range(len(r0)), [_short(r) for r in r0], fontsize=8)
    ax0.invert_yaxis()
    ax0.set_xscale("log")
    lo_x, hi_x = min(ys) / 2, max(ys) * 8
    ax0.set_xlim(lo_x, hi_x)
    _log_ticks(ax0, "x", lo_x, hi_x)
    ax0.axvline(1.0, color="black", lw=0.8, ls="--")
    ax0.text(1.05, -0.55, "target 1 ms", fontsize=7, va="bottom")
    ax0.set_xlabel("ms over the bare spawn (log scale)")
    ax0.set_title("W0 spawn overhead\n(median - bare median)", fontsize=10)
    fig.suptitle(_subtitle(results), fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def throughput_chart(results: dict, path: Path) -> Path | None:
    tp = results.get("throughput") or {}
    if tp and all(k.isdigit() for k in tp):  # an older results.json: W1 only
        tp = {"W1": tp}
    if not tp:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tp), figsize=(6.2 * len(tp), 4.6), squeeze=False)
    styles = {"bare": ("bare (trio.run_process)", COLORS["bare"], "-", "o"),
              "zviz": ("zviz, a sandbox per task", COLORS["zviz"], "-", "s"),
              "zviz_shared": ("zviz, one shared sandbox", "#aec7e8", "--", "^"),
              "bare_setsid": ("bare + setsid", "#999999", ":", "v")}
    for ax, (wl, levels) in zip(axes[0], tp.items()):
        cs = sorted(int(c) for c in levels)
        for k, (label, color, ls, mk) in styles.items():
            pts = [(c, levels[str(c)]["summary"][k]) for c in cs if k in levels[str(c)]["summary"]]
            if not pts:
                continue
            x = [c for c, _ in pts]
            y = [s["median"] for _, s in pts]
            err = [[s["median"] - s["p10"] for _, s in pts], [s["p90"] - s["median"] for _, s in pts]]
            ax.errorbar(x, y, yerr=err, label=label, color=color, ls=ls, marker=mk, capsize=3, lw=1.6)
        for c in cs:
            pr = levels[str(c)].get("pair_ratios")
            ps = levels[str(c)].get("pair_ratios_vs_setsid")
            if pr:
                y = levels[str(c)]["summary"]["zviz"]["median"]
                txt = f"x{pr['median']:.2f}" + (f"\n(setsid x{ps['median']:.2f})" if ps else "")
                ax.annotate(txt, (c, y), textcoords="offset points", xytext=(5, -24), fontsize=7.5,
                            color=COLORS["zviz"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent tasks (one trio program)")
        ax.set_ylabel("executions per second")
        what = {"W1": "W1 python3 -c 'print(1)'", "W2": "W2 agent snippet"}.get(wl, wl)
        ax.set_title(f"{what}: throughput (median, p10-p90)\nlabels: zviz / bare and zviz / (bare + setsid)", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(_subtitle(results) + f" - {results.get('meta', {}).get('cpus', '?')} CPUs bound the plateau",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def scaling_chart(results: dict, path: Path) -> Path | None:
    sm = results.get("supervisor_memory") or {}
    rows = sm.get("rows") or []
    if not rows:
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.4, 4.6))
    n = [r["sandboxes"] for r in rows]
    ax.plot(n, [r["rss_kb_per_sandbox"] for r in rows], "o-", color=COLORS["zviz"],
            label="supervisor RSS growth / N")
    ax.plot(n, [r["marginal_rss_kb_per_sandbox"] for r in rows], "s--", color="#aec7e8",
            label="marginal, per extra sandbox")
    ax.plot(n, [r["sandbox_tree_pss_kb_per_sandbox"] for r in rows], "^:", color="#7f7f7f",
            label="the sandbox's own processes (zygote + run-init + sleep), PSS / N")
    _per_n_axis(ax, n, "sandboxes open at once (each holding a sleep)", "kB per sandbox",
                "Memory per sandbox (target: supervisor <= 1024 kB)")
    if "open_cpu_ms_per_sandbox" in rows[0]:
        ax2.plot(n, [r["open_cpu_ms_per_sandbox"] for r in rows], "o-", color=COLORS["zviz"],
                 label="CPU ms per open_sandbox + start")
        ax2.plot(n, [r["spawn_cpu_ms"]["median"] for r in rows], "s-", color=COLORS["sandlock"],
                 label="CPU ms per run(/bin/true) with N held")
        ax2.plot(n, [r["idle_cpu_ms_per_s"] for r in rows], "^--", color="#7f7f7f",
                 label="idle CPU ms per second, all N together")
        _per_n_axis(ax2, n, "sandboxes open at once", "ms of supervisor CPU (user + sys)", "Supervisor CPU")
    else:
        ax2.axis("off")
    fig.suptitle(_subtitle(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_charts(results: dict, outdir: Path) -> list[Path]:
    """Write the charts that the results allow; returns their paths. Raises
    ImportError when matplotlib is missing."""
    _plt()
    outdir.mkdir(parents=True, exist_ok=True)
    made = [ratios_chart(results, outdir / "ratios.png"), throughput_chart(results, outdir / "throughput.png"),
            scaling_chart(results, outdir / "scaling.png")]
    return [p for p in made if p is not None]


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "results.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else src.parent
    results = json.loads(src.read_text())
    for p in write_charts(results, out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
