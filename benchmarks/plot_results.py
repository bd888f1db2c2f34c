"""Plot ssmkit / upstream ratios from benchmarks/results/<gpu>.json files into a PNG.

    python benchmarks/plot_results.py benchmarks/results/h200.json --out benchmarks/results/h200_ratios.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="JSON files written by the bench_*.py scripts or merged")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for f in a.results:
        data = json.loads(Path(f).read_text())
        for section in (data.get("results"), *(v.get("results") for v in data.values() if isinstance(v, dict))):
            if isinstance(section, list):
                rows += [r for r in section if isinstance(r, dict) and r.get("ratio")]
    seen, uniq = set(), []
    for r in rows:
        if r["name"] not in seen:
            seen.add(r["name"])
            uniq.append(r)
    names = [r["name"] for r in uniq]
    ratios = [r["ratio"] for r in uniq]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(names) + 1.2))
    colors = ["tab:green" if x >= 1.0 else "tab:red" for x in ratios]
    ax.barh(range(len(names)), ratios, color=colors)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("upstream time / ssmkit time (higher is better)")
    ax.set_title("ssmkit vs upstream anchors (H200)")
    for i, x in enumerate(ratios):
        ax.text(x, i, f" {x:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print("wrote", a.out, len(names), "rows")


if __name__ == "__main__":
    main()
