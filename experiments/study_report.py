"""Markdown tables of the decisive study for docs/study.md and README.md, from experiments/results/study_*.json.

    python experiments/study_report.py            # every task: rows, paired differences, and the by-step table
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fmt_ci(v: dict | None) -> str:
    if not v:
        return "-"
    s = f"{v['mean']:+.2f}"
    if v.get("ci95"):
        s += f" [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]"
    return s + f" (n={v['n']})"


def main() -> None:
    for task in ("cls", "seg", "det"):
        p = RESULTS / f"study_{task}.json"
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        rows = {k: v for k, v in d.items() if isinstance(v, dict) and "runs" in v}
        print(f"\n### {task}: {d['metric']} (baseline `{d['baseline']}`, recommended `{d.get('recommended')}`)\n")
        print("| row | mean +- std | per seed | paired diff to baseline [95% CI] |\n|---|---|---|---|")
        for name, r in rows.items():
            per = ", ".join(f"{x[d['metric']]:.2f}" if x.get(d["metric"]) is not None else x.get("status", "?")
                            for x in r["runs"])
            ms = "-" if r["mean"] is None else f"{r['mean']:.2f}" + (f" +- {r['std']:.2f}" if r["std"] is not None else "")
            print(f"| `{name}` | {ms} | {per} | {fmt_ci(r.get('vs_baseline'))} |")
        for name, r in rows.items():
            by = r.get("vs_baseline_by_step")
            if by:
                print(f"\n`{name}` - `{d['baseline']}`, paired, at every evaluated step:\n")
                print("| step | " + " | ".join(by) + " |\n|---|" + "---|" * len(by))
                print("| diff [95% CI] (n) | " + " | ".join(fmt_ci(v) for v in by.values()) + " |")


if __name__ == "__main__":
    main()
