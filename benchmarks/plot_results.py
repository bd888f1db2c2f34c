"""Plot benchmark results into a PNG: ssmkit / upstream ratios, and the fraction of the hardware
limit each row reaches.

    python benchmarks/plot_results.py benchmarks/results/h200.json --out benchmarks/results/h200_ratios.png

Top panel: upstream time / ssmkit time for every row with an anchor (green >= 1: ssmkit faster).
Bottom panel: ``hbm_frac`` (bytes moved / the HBM copy rate) and ``exp_frac`` (exponentials /
the exp2 rate) per row, the limits measured on the H200 (``benchmarks/common.py``, the anchors'
"limits"); on another GPU they are fractions of the H200's limits. ``ssmkit bench`` calls
``plot()`` on the JSON it writes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_rows(files) -> list[dict]:
    """Result rows from JSON files written by the bench_*.py scripts (``{"results": [...]}``) or
    merged ones (``{bench: {"results": [...]}}``), first occurrence of each name kept."""
    rows = []
    for f in files:
        data = json.loads(Path(f).read_text())
        sections = [data.get("results")] + [v.get("results") for v in data.values() if isinstance(v, dict)]
        for section in sections:
            if isinstance(section, list):
                rows += [r for r in section if isinstance(r, dict) and "name" in r]
    seen, uniq = set(), []
    for r in rows:
        if r["name"] not in seen:
            seen.add(r["name"])
            uniq.append(r)
    return uniq


def plot(rows: list[dict], out, title: str = "ssmkit vs upstream anchors (H200)") -> dict:
    """Write the PNG ``out``; returns how many rows each panel drew. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_rows = [r for r in rows if isinstance(r.get("ratio"), (int, float)) and r["ratio"]]
    frac_rows = [r for r in rows if isinstance(r.get("hbm_frac"), (int, float))
                 or isinstance(r.get("exp_frac"), (int, float))]
    if not ratio_rows and not frac_rows:
        raise ValueError("no row has a ratio or a hardware fraction to plot")
    panels = [p for p in (ratio_rows, frac_rows) if p]
    heights = [0.22 * len(p) + 1.0 for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.5, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = [a[0] for a in axes]
    i = 0
    if ratio_rows:
        ax = axes[i]
        i += 1
        names = [r["name"] for r in ratio_rows]
        ratios = [r["ratio"] for r in ratio_rows]
        ax.barh(range(len(names)), ratios, color=["tab:green" if x >= 1.0 else "tab:red" for x in ratios])
        ax.axvline(1.0, color="k", lw=1)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("upstream time / ssmkit time (higher is better)")
        ax.set_title(title)
        for k, x in enumerate(ratios):
            ax.text(x, k, f" {x:.2f}", va="center", fontsize=7)
    if frac_rows:
        ax = axes[i]
        names = [r["name"] for r in frac_rows]
        hbm = [r.get("hbm_frac") or 0.0 for r in frac_rows]
        exp = [r.get("exp_frac") or 0.0 for r in frac_rows]
        y = list(range(len(names)))
        ax.barh([k - 0.2 for k in y], hbm, height=0.4, color="tab:blue", label="HBM bandwidth (copy rate)")
        ax.barh([k + 0.2 for k in y], exp, height=0.4, color="tab:orange", label="exp2 throughput")
        ax.set_xlim(0, max(1.0, max(hbm + exp) * 1.08))
        ax.axvline(1.0, color="k", lw=1)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("fraction of the hardware limit (limits measured on the H200)")
        ax.set_title("fraction of the hardware limit reached")
        ax.legend(fontsize=7, loc="lower right")
        for k, (h, e) in enumerate(zip(hbm, exp)):
            if h:
                ax.text(h, k - 0.2, f" {h:.2f}", va="center", fontsize=6)
            if e:
                ax.text(e, k + 0.2, f" {e:.2f}", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"ratio_rows": len(ratio_rows), "fraction_rows": len(frac_rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="JSON files written by the bench_*.py scripts or merged")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="ssmkit vs upstream anchors (H200)")
    a = ap.parse_args(argv)
    drawn = plot(load_rows(a.results), a.out, a.title)
    print("wrote", a.out, drawn["ratio_rows"], "ratio rows,", drawn["fraction_rows"], "hardware-fraction rows")


if __name__ == "__main__":
    main()
