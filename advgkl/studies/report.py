"""A study's table and plots, from its runs' records: STUDY_DIR/summary.md, summary.csv (one
line per row: mean and std over seeds), runs.csv (one line per run), robust_vs_clean.png,
per_class.png and curves.png. Rows with missing or failed runs are shown as such."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from advgkl.evaluation.sanity import findings
from advgkl.runlog import read_metrics
from advgkl.studies.study import Run, Study, failures, run_state

METRICS = ("clean", "robust", "worst_class_robust", "check_clean", "check_robust",
           "train_minutes", "images_per_s", "co_events", "sanity_flags", "corruptions_acc",
           "worst_corruption_acc")
_TITLES = {"clean": "clean", "robust": "robust", "worst_class_robust": "worst-class robust",
           "check_clean": "val clean", "check_robust": "val PGD",
           "train_minutes": "train min", "images_per_s": "img/s", "co_events": "CO events",
           "sanity_flags": "sanity flags", "corruptions_acc": "corruptions (mean)",
           "worst_corruption_acc": "worst corruption"}
_COUNTS = ("train_minutes", "images_per_s", "co_events", "sanity_flags")


def _checked_row(rows: list[dict[str, str]], checkpoint: str) -> dict[str, str]:
    """The metrics row of the evaluated checkpoint: best.pt's epoch (the first best PGD), else
    the last epoch."""
    if checkpoint == "best.pt" and rows[0].get("robust_acc"):
        best = max(float(r["robust_acc"]) for r in rows)
        return next(r for r in rows if float(r["robust_acc"]) == best)
    return rows[-1]


def run_values(study: Study, run: Run) -> dict[str, Any]:
    """The numbers of a finished run, from its evaluation record and metrics.csv."""
    record = json.loads(study.record(run).read_text())
    rows = read_metrics(study.run_dir(run))
    checked = _checked_row(rows, study.checkpoint)
    seconds = sum(float(r["seconds"]) for r in rows)
    images = sum(float(r["images_per_s"]) * float(r["seconds"]) for r in rows)
    values = {"clean": record["clean_acc"], "robust": record["robust_acc"],
              "worst_class_robust": record["worst_class"]["robust_acc"],
              "worst_class": record["worst_class"]["class"],
              "check_clean": float(checked["clean_acc"]) if checked.get("clean_acc") else None,
              "check_robust": float(checked["robust_acc"]) if checked.get("robust_acc") else None,
              "train_minutes": seconds / 60, "images_per_s": images / seconds,
              "per_class": {str(c["class"]): c["robust_acc"] for c in record["per_class"]},
              "curve": [float(r["robust_acc"]) if r.get("robust_acc") else None for r in rows],
              "label": record["label"], "machine": record.get("machine") or "not recorded",
              **_verdicts(record, rows)}
    for attack in record["per_attack"]:
        values[f"after_{attack['attack']}"] = attack["robust_acc"]
    corrupted = study.corruption_record(run)
    if corrupted is not None:
        c = json.loads(corrupted.read_text())
        values.update(corruptions_acc=c["corruptions_acc"],
                      worst_corruption_acc=c["worst_corruption"]["accuracy"],
                      worst_corruption=c["worst_corruption"]["corruption"],
                      corruption_cells=c["cell_accuracy"], corruption_clean=c["clean_acc"],
                      corruption_names=c["result"]["corruptions"])
    return values


def _verdicts(record: dict[str, Any], rows: list[dict[str, str]]) -> dict[str, Any]:
    """The run's CO guard events (metrics.csv; none when it ran without the guard) and the
    sanity checks its evaluation flagged (none asked: None)."""
    events = [f"{r['epoch']} {r['co_event']}" for r in rows if r.get("co_event")]
    guarded = any(r.get("co_pgd_acc") for r in rows)
    sanity = record.get("sanity")
    flagged = findings(sanity["rows"]) if sanity else []
    return {"co_events": len(events) if guarded else None, "co_detail": "; ".join(events),
            "sanity_flags": sanity["flags"] if sanity else None,
            "sanity_flagged": "; ".join(flagged)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(study: Study) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(one summary per row, the values of each finished run by name)."""
    failed = failures(study)
    done = {r.name: run_values(study, r) for r in study.runs if run_state(study, r) == "done"}
    summary = []
    for row in study.rows:
        runs = [r for r in study.runs if r.row == row]
        got = [done[r.name] for r in runs if r.name in done]
        bad = [r.name for r in runs if r.name in failed and r.name not in done]
        status = ("complete" if len(got) == len(runs) else
                  f"{len(got)}/{len(runs)} runs" + (f", failed: {', '.join(bad)}" if bad else ""))
        entry: dict[str, Any] = {"row": row, "runs_done": len(got), "runs_total": len(runs),
                                 "status": status}
        keys = [*METRICS, *sorted(k for k in (got[0] if got else {}) if k.startswith("after_"))]
        for key in keys:
            vals = [v[key] for v in got if v.get(key) is not None]
            if vals:
                entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std(vals)
        summary.append(entry)
    return summary, done


def _pct(entry: dict[str, Any], key: str) -> str:
    if f"{key}_mean" not in entry:
        return "-"
    scale = 1 if key in _COUNTS else 100
    digits = {"images_per_s": 0, "train_minutes": 2}.get(key, 1)
    return f"{scale * entry[f'{key}_mean']:.{digits}f} ± {scale * entry[f'{key}_std']:.{digits}f}"


def write_report(study: Study) -> Path:
    """Write the summary files and plots; returns summary.md's path."""
    summary, done = summarize(study)
    study.dir.mkdir(parents=True, exist_ok=True)
    label = next((v["label"] for v in done.values()), "no evaluation finished yet")
    attacks = sorted({k[:-5] for e in summary for k in e if k.startswith("after_") and
                      k.endswith("_mean")}, key=lambda a: _ATTACK_ORDER.get(a, 99))
    corrupted = ["corruptions_acc", "worst_corruption_acc"] if study.eval.get("corruptions") \
        else []
    columns = ["clean", "robust", *attacks, "worst_class_robust", *corrupted, "check_clean",
               "check_robust", "train_minutes", "images_per_s", "co_events", "sanity_flags"]
    with open(study.dir / "summary.csv", "w", newline="") as f:
        fields = ["row", "runs_done", "runs_total", "status",
                  *(f"{c}_{s}" for c in columns for s in ("mean", "std"))]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    with open(study.dir / "runs.csv", "w", newline="") as f:
        fields = ["run", "row", "seed", *columns, "worst_class", "worst_corruption", "co_detail",
                  "sanity_flagged", "machine"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for run in study.runs:
            if run.name in done:
                writer.writerow({"run": run.name, "row": run.row, "seed": run.seed,
                                 **done[run.name]})
    titles = [_TITLES.get(c, c.replace("after_", "after ")) for c in columns]
    lines = [f"# Study {study.name}", "",
             f"{len(study.rows)} rows x seeds {study.seeds}; evaluation: {label} on "
             f"{study.eval['n_examples']} test points, {study.eval['norm']} eps "
             f"{study.eval['eps']}, checkpoint {study.checkpoint}. Accuracies in %, mean ± std "
             "over seeds (sample std); val = the per-epoch check on held-out training images.",
             "", "| row | runs | " + " | ".join(titles) + " |",
             "|---|---|" + "---|" * len(titles)]
    for entry in summary:
        runs = (f"{entry['runs_done']}/{entry['runs_total']}" if entry["status"] == "complete"
                else entry["status"])
        lines.append(f"| {entry['row']} | {runs} | "
                     + " | ".join(_pct(entry, c) for c in columns) + " |")
    lines += _run_notes(study, done)
    lines += ["", "![robust vs clean](robust_vs_clean.png) ![per class](per_class.png) "
              "![curves](curves.png)", ""]
    if corrupted:
        lines += [f"Corruptions: {_shown(Path(study.eval['corruptions']))} (see its index.json); "
                  "accuracy per corruption and severity, mean over seeds, per row:", "",
                  " ".join(f"![{row}]({path.name})" for row, path in
                           _corruption_heatmaps(study, done).items()), ""]
    (study.dir / "summary.md").write_text("\n".join(lines))
    _plots(study, summary, done)
    return study.dir / "summary.md"


def _run_notes(study: Study, done: dict[str, dict[str, Any]]) -> list[str]:
    """The machines behind the numbers, and each run's CO events and sanity flags."""
    machines = sorted({v["machine"] for v in done.values()})
    lines = ["", "Machine: " + ("; ".join(machines) or "no run finished") + ". A rerun on another "
             "processor or thread count moves the last digits; the spread over seeds is the "
             "result."]
    notes = [f"- {run.name}: " + "; ".join(filter(None, (
        done[run.name]["co_detail"] and f"CO guard at epoch {done[run.name]['co_detail']}",
        done[run.name]["sanity_flagged"] and f"sanity FLAG: {done[run.name]['sanity_flagged']}")))
        for run in study.runs if run.name in done
        and (done[run.name]["co_detail"] or done[run.name]["sanity_flagged"])]
    if notes:
        lines += ["", "Per run (CO guard events; sanity checks flagged):", "", *notes]
    return lines


def _shown(path: Path) -> str:
    """A path as the summary shows it: relative to the current folder when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _corruption_heatmaps(study: Study, done: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """One heatmap per row: each cell's accuracy, mean over the row's finished seeds."""
    from advgkl.evaluation.corruption_records import heatmap

    paths = {}
    for row in study.rows:
        runs = [done[r.name] for r in study.runs if r.row == row and r.name in done
                and "corruption_cells" in done[r.name]]
        if not runs:
            continue
        cells = {k: statistics.fmean(v["corruption_cells"][k] for v in runs)
                 for k in runs[0]["corruption_cells"]}
        clean = statistics.fmean(v["corruption_clean"] for v in runs)
        paths[row] = study.dir / f"corruptions_{row}.png"
        heatmap(cells, clean, runs[0]["corruption_names"], paths[row],
                f"{study.name}: {row} ({len(runs)} seeds), mean "
                f"{100 * statistics.fmean(cells.values()):.1f}%")
    return paths


_ATTACK_ORDER = {f"after_{a}": i for i, a in enumerate(
    ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab"))}


def _plots(study: Study, summary: list[dict[str, Any]], done: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {row: f"C{i % 10}" for i, row in enumerate(study.rows)}
    by_row = {row: [done[r.name] for r in study.runs if r.row == row and r.name in done]
              for row in study.rows}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for entry in summary:
        runs = by_row[entry["row"]]
        if not runs:
            continue
        ax.scatter([100 * v["clean"] for v in runs], [100 * v["robust"] for v in runs],
                   color=colors[entry["row"]], alpha=0.5, s=20)
        ax.scatter(100 * entry["clean_mean"], 100 * entry["robust_mean"], marker="X", s=120,
                   color=colors[entry["row"]], edgecolor="black", label=entry["row"])
    _save(fig, ax, study.dir / "robust_vs_clean.png", xlabel="clean accuracy (%)",
          ylabel="robust accuracy (%)", title=f"{study.name}: runs (dots) and row means (X)")

    fig, ax = plt.subplots(figsize=(7, 4))
    for row, runs in by_row.items():
        if runs:
            classes = sorted(runs[0]["per_class"], key=int)
            means = [100 * sum(v["per_class"][c] for v in runs) / len(runs) for c in classes]
            ax.plot(classes, means, marker="o", color=colors[row], label=row)
    _save(fig, ax, study.dir / "per_class.png", xlabel="class", ylabel="robust accuracy (%)",
          title="robust accuracy per class (mean over seeds)")

    fig, ax = plt.subplots(figsize=(7, 4))
    for row, runs in by_row.items():
        curves = [v["curve"] for v in runs if v["curve"] and None not in v["curve"]]
        if curves:
            n = min(map(len, curves))
            ax.plot(range(1, n + 1), [100 * sum(c[i] for c in curves) / len(curves)
                                      for i in range(n)], color=colors[row], label=row)
    _save(fig, ax, study.dir / "curves.png", xlabel="epoch",
          ylabel="PGD accuracy on held-out training images (%)",
          title="training curves (mean over seeds)")


def _save(fig, ax, path: Path, **labels: str) -> None:
    import matplotlib.pyplot as plt

    ax.set(**labels)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
