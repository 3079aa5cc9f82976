"""The ablations' table and plot over seeds (scripts/toy_ablations.sh's last step).

    python scripts/toy_ablation_report.py --out_dir runs/toy_ablations --runs runs/toy runs/toy_seed1 runs/toy_seed2

Each run is a main toy run (its summary.json, from toy_report.py) with ablations/{direct,no_misread,rl_only,forced_exit}/
beside it. Writes out_dir/summary.json (every number per seed), out_dir/report.md (mean and spread over the
seeds) and out_dir/ablations.png (text and image accuracy per stage and per ablation), and prints the table.
"""

import argparse
import json
import os
import statistics

# (label, folder under the main run ("" = the main run itself), stage in that run's summary)
ROWS = [("stage 0: base VLM", "", "base"),
        ("CoT SFT (stage 1, text only)", "", "sft"),
        ("CoT SFT + GRPO (stages 1-2, text only)", "", "rl"),
        ("direct-answer SFT (no chain of thought)", "ablations/direct", "sft"),
        ("CoT SFT, a teacher that never misreads", "ablations/no_misread", "sft"),
        ("GRPO only (no SFT)", "ablations/rl_only", "rl"),
        ("CoT SFT, forced exit", "ablations/forced_exit", "sft"),
        ("CoT SFT + GRPO, forced exit", "ablations/forced_exit", "rl")]
# (column, how to read it from a stage's summary)
COLUMNS = [("text acc %", lambda s: s["toy_text"]["accuracy"]),
           ("image acc %", lambda s: s["toy_image"]["accuracy"]),
           ("image restated %", lambda s: s["probe"]["image"]["restated"] if s.get("probe") else None),
           ("follows a swapped restatement (text) %", lambda s: s["probe"]["text"]["follows"] if s.get("probe") else None),
           ("right given the right restatement (image) %",
            lambda s: s["probe"]["image"]["given_restated"] if s.get("probe") else None),
           ("OCR %", lambda s: s.get("ocr"))]


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def spread(values):
    """'mean ± sd' in percent over the seeds that have the number ('-' when none do; '(n seeds)' when
    only some do)."""
    xs = [100 * v for v in values if v is not None]
    if not xs:
        return "-"
    some = f" ({len(xs)} of {len(values)} seeds)" if len(xs) < len(values) else ""
    return (f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}") + some


def plot(table, seeds, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _, _ in ROWS if label in table]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for k, (col, color) in enumerate((("text acc %", "tab:blue"), ("image acc %", "tab:orange"))):
        for i, label in enumerate(labels):
            xs = [100 * v for v in table[label][col] if v is not None]
            if not xs:
                continue
            x = i + (k - 0.5) * 0.38
            ax.bar(x, statistics.mean(xs), 0.36, color=color, alpha=0.75, label=col.removesuffix(" %") if i == 0 else None,
                   yerr=statistics.stdev(xs) if len(xs) > 1 else 0, capsize=3)
            ax.plot([x] * len(xs), xs, "k.", markersize=4)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([label.split(" (")[0] for label in labels], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy % (greedy)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Text-only post-training, tested on text and on images: mean ± sd over {seeds} seeds (dots: seeds)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="the main toy runs, one per seed")
    parser.add_argument("--out_dir", default="runs/toy_ablations")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    table = {}  # label -> column -> [value per seed]
    for label, folder, stage in ROWS:
        stages = [((load(os.path.join(run, folder, "summary.json")) or {}).get("stages") or {}).get(stage)
                  for run in args.runs]
        if all(s is None for s in stages):
            print(f"skipping '{label}': no run has {os.path.join(folder or '.', 'summary.json')} with a {stage} stage")
            continue
        # a seed without this ablation counts as missing (None), not as a zero
        table[label] = {col: [None if s is None else get(s) for s in stages] for col, get in COLUMNS}
    base = table.get(ROWS[0][0])
    if base:  # the transfer: image accuracy over the base model's, per seed
        for row in table.values():
            row["image gain over base (points)"] = [None if a is None else a - b
                                                    for a, b in zip(row["image acc %"], base["image acc %"])]

    cols = [col for col, _ in COLUMNS] + (["image gain over base (points)"] if base else [])
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(spread(row[c]) for c in cols) + " |")
    md = "\n".join(lines)
    plot(table, len(args.runs), os.path.join(args.out_dir, "ablations.png"))
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump({"runs": args.runs, "table": table}, f, indent=1)
    per_seed = "\n".join(f"- {label}: image " + ", ".join("-" if v is None else f"{100 * v:.1f}" for v in row["image acc %"])
                         + "; text " + ", ".join("-" if v is None else f"{100 * v:.1f}" for v in row["text acc %"])
                         for label, row in table.items())
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(f"""# X-Reasoner in miniature: stages and ablations over {len(args.runs)} seeds

Runs: {', '.join(args.runs)} (one seed each; every ablation reuses its seed's base model and data). Greedy
accuracy on the 200 held-out problems, asked as text and, the same problems, drawn as images; the mechanism
columns come from scripts/toy_probe.py on 100 of them. Each cell is the mean ± standard deviation over the seeds.

{md}

![text and image accuracy per stage and ablation](ablations.png)

Per seed (in the order of the runs above), accuracy %:
{per_seed}
""")
    print(md)
    print(f"\nreport: {os.path.join(args.out_dir, 'report.md')}")


if __name__ == "__main__":
    main()
