"""Turn lgtm.py run folders into a results table, learning curves and the influence figure.

    python results.py runs/                   # writes runs/results.csv, curves.png, influence.png
    python results.py runs/ --out results     # the same files into results/

Each finished run counts once: the dev score of its best student (accuracy; the mean of F1 and
accuracy for mrpc and qqp), in percent. Runs are grouped by their setting: every flag but the seed,
the output folder and those that change no result (--resume, --overwrite, --logging-steps,
--predict). The table names task, method (with its --influence-weight when it is not 1), feedback
set (dev, or the --feedback-split fraction) and, under "other flags", any other flag on which the
runs differ. It gives mean ± sample std over the seeds, n, how many runs' best student gave every
dev example one class (collapsed), and the median of ||∇θt influence term|| / ||∇θt L_aux||. Two
runs of the same setting and seed count once: the first found; the others are named on stderr.
curves.png: the dev score against the step, mean over seeds, student solid and teacher dashed.
influence.png, from runs with --probe-samples (the paper's figures 4 and 3): left, the influence
w_i of each probed example at each evaluation; right, the two examples of most negative and most
positive mean w_i, with the probability that teacher and student give their gold label.
"""

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

NOT_SETTINGS = {"seed", "output_dir", "resume", "overwrite", "logging_steps", "predict"}
SHOWN = {"task", "method", "influence_weight", "feedback_split"}  # each in a column of its own


def load_runs(roots):
    """The finished runs under the folders, one per setting and seed, and why others were left
    out (not finished, or a setting and seed already found)."""
    runs = {}
    skipped = []
    for root in roots:
        for path in sorted(Path(root).rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            if metrics.get("status") != "finished" or not metrics.get("best"):
                skipped.append(f"{path.parent} (not finished: {metrics.get('status')})")
                continue
            run = run_summary(path.parent, metrics)
            key = (json.dumps(run["setting"], sort_keys=True, default=str), run["seed"])
            if key in runs:
                skipped.append(f"{path.parent} (the same setting and seed as {runs[key]['path']})")
                continue
            runs[key] = run
    runs = list(runs.values())
    name_other_flags(runs)
    return runs, skipped


def name_other_flags(runs):
    """Each run's "other flags": its values of the flags, beside those with a column of their
    own, on which the runs differ."""
    names = sorted({name for run in runs for name in run["setting"]} - SHOWN)
    differ = [name for name in names if len({str(run["setting"].get(name)) for run in runs}) > 1]
    for run in runs:
        values = [f"--{name.replace('_', '-')} {run['setting'].get(name)}" for name in differ]
        run["other"] = " ".join(values)


def run_summary(path, metrics):
    """What the table and the figures need of one run's metrics.json."""
    args = metrics["args"]
    setting = {name: value for name, value in args.items() if name not in NOT_SETTINGS}
    method = args["method"]
    weight = float(args.get("influence_weight", 1.0))
    if weight != 1.0:
        method += f" λ={weight:g}"
    feedback = "dev"
    split = float(args.get("feedback_split") or 0)
    if split:
        feedback = f"split {split:g}"
    ratio = (metrics.get("influence_aux_ratio") or {}).get("median")
    return {"name": path.name, "path": path, "setting": setting, "task": args["task"],
            "seed": args["seed"], "method": method,
            "feedback": feedback, "score": 100 * metrics["best"]["student"]["score"],
            "history": metrics["history"],
            "collapsed": "student" in metrics["best"].get("collapsed", []), "ratio": ratio,
            "probe_rows": metrics.get("probe_rows")}


def summarise(runs):
    groups = defaultdict(list)
    for run in runs:
        groups[(run["task"], run["method"], run["feedback"], run["other"])].append(run)
    rows = []
    for (task, method, feedback, other), members in sorted(groups.items()):
        scores = np.array([r["score"] for r in members])
        ratios = [r["ratio"] for r in members if r["ratio"] is not None]
        std = 0.0
        if len(scores) > 1:
            std = float(scores.std(ddof=1))  # the sample standard deviation
        median_ratio = None
        if ratios:
            median_ratio = float(np.median(ratios))
        rows.append({"task": task, "method": method, "feedback": feedback, "other": other,
                     "n": len(scores),
                     "mean": float(scores.mean()), "std": std,
                     "collapsed": sum(r["collapsed"] for r in members), "ratio": median_ratio})
    return rows


def markdown(rows):
    lines = ["| task | feedback | method | other flags | dev score, mean ± std | n | collapsed | "
             "median ‖∇ influence‖ / ‖∇ L_aux‖ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = "—"
        if r["ratio"] is not None:
            ratio = f"{r['ratio']:.1e}"
        std = "—"  # a single run has no sample std
        if r["n"] > 1:
            std = f"{r['std']:.2f}"
        lines.append(f"| {r['task']} | {r['feedback']} | {r['method']} | {r['other']} | "
                     f"{r['mean']:.2f} ± {std} | {r['n']} | {r['collapsed']} | {ratio} |")
    return "\n".join(lines)


def plot_curves(runs, path, plt):
    panels = sorted({(r["task"], r["feedback"]) for r in runs})
    methods = sorted({(r["method"], r["other"]) for r in runs})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (task, feedback) in zip(axes[0], panels):
        for method in methods:
            members = [r for r in runs if (r["task"], r["feedback"], (r["method"], r["other"])) ==
                       (task, feedback, method)]
            if not members:
                continue
            steps = sorted({h["step"] for r in members for h in r["history"]})
            for model, style in (("student", "-"), ("teacher", "--")):
                curve = [np.mean([100 * h[model]["score"] for r in members for h in r["history"]
                                  if h["step"] == s]) for s in steps]
                ax.plot(steps, curve, style, color=colours[method],
                        label=f"{' '.join(method)} {model} (n={len(members)})")
        ax.set(title=f"{task}, feedback from {feedback}", xlabel="training step",
               ylabel="dev score (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_influence(runs, path, plt):
    probed = [r for r in runs if r["probe_rows"] and any("probe" in h for h in r["history"])]
    fig, axes = plt.subplots(len(probed), 2, figsize=(13, 3.8 * len(probed)), squeeze=False)
    for (left, right), run in zip(axes, probed):
        history = [h for h in run["history"] if "probe" in h]
        steps = [h["step"] for h in history]
        w = np.array([h["probe"]["w"] for h in history])  # evaluations x probed examples
        left.plot(steps, w, color="tab:blue", alpha=0.25, lw=0.8)
        left.plot(steps, w.mean(1), color="black", lw=2, label="mean over the probed examples")
        left.axhline(0, color="gray", lw=0.8)
        left.set(title=f"{run['name']}: w_i of {w.shape[1]} fixed training examples",
                 xlabel="training step", ylabel="distillation influence w_i")
        left.legend(fontsize=8)
        twin = right.twinx()
        for i, colour in ((int(w.mean(0).argmin()), "tab:red"), (int(w.mean(0).argmax()),
                                                                  "tab:green")):
            row = run["probe_rows"][i]
            right.plot(steps, w[:, i], "o-", color=colour, label=f"row {row}: w_i")
            for model, style in (("teacher", ":"), ("student", "--")):
                twin.plot(steps, [h["probe"][f"{model}_p_gold"][i] for h in history], style,
                          color=colour, label=f"row {row}: {model} P(gold)")
        right.axhline(0, color="gray", lw=0.8)
        right.set(title="the examples of lowest and highest mean w_i", xlabel="training step",
                  ylabel="w_i")
        twin.set(ylabel="probability of the gold label (note the range)")
        handles = [axis.get_legend_handles_labels() for axis in (right, twin)]
        right.legend(handles[0][0] + handles[1][0], handles[0][1] + handles[1][1], loc="upper left",
                     fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="folders to search for metrics.json")
    p.add_argument("--out", type=Path, help="where the table and figures go (default: the first "
                   "runs folder)")
    args = p.parse_args(argv)
    out = args.out or Path(args.runs[0])
    runs, skipped = load_runs(args.runs)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    if not runs:
        sys.exit(f"error: no finished run (metrics.json, status finished) under {args.runs}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "method", "feedback", "other", "n", "mean",
                                               "std", "collapsed", "ratio"])
        writer.writeheader()
        writer.writerows({k: f"{v:.4f}" if k in ("mean", "std") else v for k, v in r.items()}
                         for r in rows)
    plot_curves(runs, out / "curves.png", plt)
    written = ["results.csv", "curves.png"]
    if any(r["probe_rows"] for r in runs):
        plot_influence(runs, out / "influence.png", plt)
        written.append("influence.png")
    table = markdown(rows)
    print(table)
    print(f"\nwrote {', '.join(str(out / f) for f in written)} from {len(runs)} runs")
    return table


if __name__ == "__main__":
    main()
