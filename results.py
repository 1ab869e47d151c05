"""Turn lgtm.py run directories into the results table and the learning curves.

    python results.py runs/                      # every metrics.json under runs/
    python results.py runs/ --out results        # writes results/results.csv and results/curves.png

Each finished run counts once: the dev score of its best student (accuracy; the mean of F1 and accuracy for
mrpc and qqp), in percent. Runs are grouped by task, method (with its --influence-weight when it is not 1)
and feedback set (dev, or the --feedback-split fraction); the table gives mean ± sample std over the seeds
and n. The figure shows the dev score against the step, mean over seeds: one colour per method, the student
solid, the teacher dashed. Standard library, numpy and matplotlib only.
"""

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load_runs(roots):
    runs, skipped = [], []
    for root in roots:
        for path in sorted(Path(root).rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            if metrics.get("status") != "finished" or not metrics.get("best"):
                skipped.append(f"{path.parent} ({metrics.get('status')})")
                continue
            args = metrics["args"]
            weight = float(args.get("influence_weight", 1.0))
            method = args["method"] + (f" λ={weight:g}" if weight != 1.0 else "")
            feedback = f"split {args['feedback_split']:g}" if args.get("feedback_split") else "dev"
            runs.append({"task": args["task"], "method": method, "feedback": feedback, "seed": args["seed"],
                         "score": 100 * metrics["best"]["student"]["score"], "history": metrics["history"],
                         "collapsed": any("the student predicts" in w for w in metrics.get("warnings", [])),
                         "ratio": metrics.get("influence_to_aux_grad_norm", {}).get("median")})
    return runs, skipped


def summarise(runs):
    groups = defaultdict(list)
    for run in runs:
        groups[(run["task"], run["method"], run["feedback"])].append(run)
    rows = []
    for (task, method, feedback), members in sorted(groups.items()):
        scores = np.array([r["score"] for r in members])
        ratios = [r["ratio"] for r in members if r["ratio"] is not None]
        rows.append({"task": task, "method": method, "feedback": feedback, "n": len(scores),
                     "mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                     "collapsed": sum(r["collapsed"] for r in members),
                     "ratio": float(np.median(ratios)) if ratios else None})
    return rows


def markdown(rows):
    lines = ["| task | feedback | method | dev score, mean ± std | n | runs with a collapsed student | "
             "median ‖∇ influence‖ / ‖∇ L_aux‖ |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['ratio']:.1e}" if r["ratio"] is not None else "—"
        lines.append(f"| {r['task']} | {r['feedback']} | {r['method']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['n']} "
                     f"| {r['collapsed']} | {ratio} |")
    return "\n".join(lines)


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({(r["task"], r["feedback"]) for r in runs})
    methods = sorted({r["method"] for r in runs})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, (task, feedback) in zip(axes[0], tasks):
        for method in methods:
            members = [r for r in runs if (r["task"], r["feedback"], r["method"]) == (task, feedback, method)]
            if not members:
                continue
            steps = sorted({h["step"] for r in members for h in r["history"]})
            for model, style in (("student", "-"), ("teacher", "--")):
                curve = [np.mean([100 * h[model]["score"] for r in members for h in r["history"] if h["step"] == s])
                         for s in steps]
                ax.plot(steps, curve, style, color=colours[method], label=f"{method} {model} (n={len(members)})")
        ax.set(title=f"{task}, feedback from {feedback}", xlabel="training step", ylabel="dev score (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders to search for metrics.json")
    p.add_argument("--out", type=Path, default=Path("results"), help="where results.csv and curves.png go")
    args = p.parse_args(argv)
    runs, skipped = load_runs(args.runs)
    for s in skipped:
        print(f"skipped, not finished: {s}", file=sys.stderr)
    if not runs:
        sys.exit(f"error: no finished run (metrics.json with status 'finished') under {', '.join(args.runs)}")
    rows = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "method", "feedback", "n", "mean", "std"])
        writer.writeheader()
        writer.writerows({k: f"{r[k]:.4f}" if k in ("mean", "std") else r[k] for k in writer.fieldnames}
                         for r in rows)
    plot(runs, args.out / "curves.png")
    table = markdown(rows)
    print(table)
    print(f"\nwrote {args.out / 'results.csv'} and {args.out / 'curves.png'} from {len(runs)} runs")
    return table


if __name__ == "__main__":
    main()
