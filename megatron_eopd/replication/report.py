"""The study's report: ``report.md`` with its tables and verdicts, PNG plots, and ``summary.json``.

:func:`write_report` reads the study directory (:func:`.results.summarize_study`), draws the plots
with matplotlib's Agg backend (no display needed) and renders Markdown that embeds them by relative
path, so the study directory can be copied or browsed as it is.  Every number printed comes from the
summary, and the summary from the runs' files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from megatron_eopd.data.synthetic import SOURCE, TASKS
from megatron_eopd.replication.results import summarize_study
from megatron_eopd.replication.study import METHODS, write_json

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
PLOT_DIR = "plots"
COLORS = {"opd": "#0072B2", "eopd": "#D55E00", "fkl_only": "#009E73",  # Okabe-Ito: colour-blind safe
          "eopd_tau0.4": "#E69F00", "eopd_tau1.6": "#CC79A7", "eopd_top32": "#56B4E9"}
CURVES = (
    ("student_entropy", "entropy.png", "Student token entropy (nats)",
     "Student token entropy on its own rollouts"),
    ("fkl_gated", "fkl_high_entropy.png", "FKL on tokens with teacher entropy > tau (nats)",
     "Forward KL (teacher top-k) on high-entropy tokens"),
    ("gate_fraction", "gate_fraction.png", "Share of tokens with teacher entropy > tau",
     "Share of response tokens above tau"),
)
SECTIONS = ("Verdicts: the paper's three directions", "Results", "Training curves", "Held-out Pass@k",
            "Per run", "Setup and definitions")


# --------------------------------------------------------------------------- number formatting


def fmt(value: Optional[float], kind: str) -> str:
    """``nats``: 3 decimals; ``pct``: percent with 1 decimal; ``ratio``: 2 decimals; None: an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "ratio":
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_spread(s: dict, kind: str) -> str:
    """``mean ± std`` over seeds (just the mean for one seed)."""
    if s["mean"] is None:
        return "–"
    if s["std"] is None:
        return fmt(s["mean"], kind)
    return f"{fmt(s['mean'], kind)} ± {fmt(s['std'], kind)}"


def fmt_delta(value: Optional[float], kind: str) -> str:
    if value is None:
        return "–"
    sign = "+" if value > 0 else "−" if value < 0 else "±"
    if kind == "ratio_pct":  # a relative difference, in percent
        return f"{sign}{100 * abs(value):.1f}%"
    return f"{sign}{fmt(abs(value), kind)}" + (" points" if kind == "pct" else "")


def fmt_interval(interval: Optional[dict], kind: str) -> str:
    """``[low, high] (95%, S seeds x P problems): verdict; smallest detectable effect X``."""
    if not interval:
        return ""
    shape = (f"{interval['num_seeds']} seeds x {interval['num_problems']} problems" if interval["num_problems"] > 1
             else f"{interval['num_seeds']} seeds")
    unit = " points" if kind == "pct" else ""
    return (f"paired bootstrap ({shape}): {fmt_delta(interval['delta'], kind)}, "
            f"{100 * interval['level']:.0f}% interval [{fmt_delta(interval['low'], kind).replace(' points', '')}, "
            f"{fmt_delta(interval['high'], kind).replace(' points', '')}]{unit}: **{interval['verdict']}**"
            f"{' (' + interval['note'] + ')' if interval.get('note') else ''}; "
            f"smallest effect this budget detects (80% power): {fmt(interval['smallest_detectable'], kind)}{unit}")


# --------------------------------------------------------------------------- plots


def _smooth(values: Sequence[Optional[float]], width: int) -> list[Optional[float]]:
    """Trailing moving average over the last ``width`` defined values (None stays None)."""
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        window = [v for v in values[max(0, i - width + 1): i + 1] if v is not None]
        out.append(sum(window) / len(window))
    return out


def _band(runs: Sequence[dict], key: str, width: int):
    """Per iteration: mean and std over seeds of the smoothed curves (NaN where undefined)."""
    import numpy as np

    curves = [_smooth(r["curves"][key], width) for r in runs]
    length = max(len(c) for c in curves)
    table = np.full((len(curves), length), np.nan)
    for row, curve in enumerate(curves):
        table[row, : len(curve)] = [np.nan if v is None else v for v in curve]
    counts = np.sum(~np.isnan(table), axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(counts > 0, np.nansum(table, axis=0) / np.maximum(counts, 1), np.nan)
        var = np.where(counts > 1, np.nansum((table - mean) ** 2, axis=0) / np.maximum(counts - 1, 1), np.nan)
    return np.arange(1, length + 1), mean, np.sqrt(var)


def plot_curves(summary: dict, key: str, ylabel: str, title: str, path: Path, width: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    methods = list(summary["config"]["methods"])
    # The paper's comparison gets its own panel when a third arm's scale would flatten it.
    panels = [(methods, "all methods")]
    if {"opd", "eopd"} <= set(methods) and len(methods) > 2:
        panels.append((["opd", "eopd"], "OPD and EOPD only (zoom)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels) * 0.8 + 1.4, 4.2), dpi=120, squeeze=False)
    for ax, (shown, panel_title) in zip(axes[0], panels):
        for method in shown:
            runs = [r for r in summary["runs"] if r["method"] == method]
            if not runs:
                continue
            x, mean, std = _band(runs, key, width)
            color = COLORS.get(method)
            label = f"{METHODS[method].label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            ax.plot(x, mean, color=color, linewidth=1.8, label=label, marker="o" if len(x) <= 5 else None)
            if len(runs) > 1:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training iteration")
        ax.set_ylabel(ylabel)
        if len(panels) > 1:
            ax.set_title(panel_title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False)
    smoothing = f"; trailing mean over {width} iterations" if width > 1 else ""
    tau = summary["trainer_settings"].get("tau")
    title += f" (tau = {tau} nats)" if tau is not None and key != "student_entropy" else ""
    fig.suptitle(f"{title}\nline: mean over seeds, band: ± 1 std over seeds{smoothing}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pass_at_k(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ks = summary["config"]["ks"]
    names = [f"pass@{k}" for k in ks]
    bars = [(METHODS[m].label, summary["per_method"][m], COLORS.get(m), None)
            for m in summary["config"]["methods"] if m in summary["per_method"]]
    references = summary["references"]
    for name, label, color, hatch in (("student_base", "student base", "#BBBBBB", "//"),
                                      ("teacher", "teacher", "#555555", "..")):
        if name in references:
            bars.append((label, {key: {"mean": references[name][key], "std": None, "values": []} for key in names},
                         color, hatch))
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    x = np.arange(len(names))
    width = 0.8 / max(len(bars), 1)
    for i, (label, stats, color, hatch) in enumerate(bars):
        offset = x - 0.4 + width * (i + 0.5)
        means = [100 * stats[n]["mean"] for n in names]  # percent, like the tables
        errors = [100 * (stats[n]["std"] or 0.0) for n in names]
        ax.bar(offset, means, width * 0.92, color=color, hatch=hatch, edgecolor="black", linewidth=0.5,
               label=label, yerr=errors if any(errors) else None, capsize=3, error_kw={"linewidth": 1})
        for j, n in enumerate(names):  # each seed as a dot, the mean in percent above the bar
            seeds = [100 * v for v in stats[n]["values"] if v is not None]
            if len(seeds) > 1:
                ax.scatter([offset[j]] * len(seeds), seeds, s=9, color="black", zorder=3)
            top = max([means[j] + errors[j]] + seeds)
            ax.text(offset[j], top + 1.5, f"{means[j]:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"Pass@{k}" for k in ks])
    ax.set_ylim(0, 110)
    ax.set_ylabel("held-out Pass@k (%)")
    n_problems = summary["config"]["eval_problems"]
    ax.set_title(f"Held-out Pass@k ({n_problems} test problems x {summary['config']['eval_samples']} samples)\n"
                 "bar: mean over seeds, error bar: ± 1 std over seeds, dots: seeds", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8, ncol=min(len(bars), 5), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pass_at_k_curves(summary: dict, path: Path) -> None:
    """Pass@k against k (1, 2, 4, ... n) per method: the mean over seeds, a band from the lowest to the
    highest seed and each seed as a thin line; the references dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    for method, curve in summary["pass_at_k_curves"].items():
        color, ks = COLORS.get(method), curve["k"]
        ax.plot(ks, [100 * v for v in curve["mean"]], marker="o", ms=3, color=color,
                label=f"{METHODS[method].label} ({len(curve['seeds'])} seeds)")
        if len(curve["seeds"]) > 1:
            ax.fill_between(ks, [100 * v for v in curve["min"]], [100 * v for v in curve["max"]], color=color,
                            alpha=0.18, linewidth=0)
            for values in curve["per_seed"]:
                ax.plot(ks, [100 * v for v in values], color=color, alpha=0.35, linewidth=0.6)
    for name, label, color in (("student_base", "student base", "#888888"), ("teacher", "teacher", "#222222")):
        reference = summary["references"].get(name)
        if reference:
            ks = [k for k in next(iter(summary["pass_at_k_curves"].values()))["k"] if f"pass@{k}" in reference]
            ax.plot(ks, [100 * reference[f"pass@{k}"] for k in ks], linestyle="--", color=color, label=label)
    ax.set_xscale("log", base=2)
    ks = next(iter(summary["pass_at_k_curves"].values()))["k"] if summary["pass_at_k_curves"] else [1]
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0, 105)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("held-out Pass@k (%)")
    ax.set_title(f"Held-out Pass@k curves ({summary['config']['eval_problems']} test problems x "
                 f"{summary['config']['eval_samples']} samples)\nline: mean over seeds, band: lowest to highest "
                 "seed, thin lines: seeds", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- Markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _verdict_lines(summary: dict) -> list[str]:
    tau = summary["trainer_settings"].get("tau")
    lines = []
    for d in summary["directions"]:
        head = f"- **{d['claim']}: {d['status']}.**"
        if d.get("delta") is None:
            lines.append(head)
            continue
        kind = "pct" if d["key"] == "pass_at_k" else "nats"
        rel = (f", {fmt_delta(d['relative'], 'ratio_pct')} of OPD" if d.get("relative") is not None else "")
        text = (f"{head} {d['quantity'][0].upper() + d['quantity'][1:]}"
                f"{f' (tau = {tau})' if d['key'] == 'fkl_high_entropy' and tau is not None else ''}: "
                f"EOPD {fmt_spread(d['eopd'], kind)}, OPD {fmt_spread(d['opd'], kind)}; "
                f"difference EOPD − OPD {fmt_delta(d['delta'], kind)}{rel}; the paper expects it "
                f"{'positive' if d['better'] == 'higher' else 'negative'}.")
        if d.get("spread_sum") is not None:
            text += (f" Seed spread (std EOPD + std OPD): {fmt(d['spread_sum'], kind)}"
                     f"{' points' if kind == 'pct' else ''}.")
        if d.get("every_seed_separated") is not None:
            text += (" Every EOPD seed is on the paper's side of every OPD seed."
                     if d["every_seed_separated"] else " The seeds of the two methods overlap.")
        if d.get("interval"):
            sentence = fmt_interval(d["interval"], kind)
            text += f" {sentence[0].upper()}{sentence[1:]}."
        lines.append(text)
        for name, c in (d.get("per_k") or {}).items():
            if c.get("delta") is None:
                continue
            interval = (d.get("intervals") or {}).get(name)
            lines.append(f"  - {name.replace('pass', 'Pass')}: {c['status']}; EOPD − OPD {fmt_delta(c['delta'], 'pct')}"
                         + (f", seed spread {fmt(c['spread_sum'], 'pct')} points" if c.get("spread_sum") is not None
                            else "")
                         + (f"; {fmt_interval(interval, 'pct')}" if interval else ""))
    return lines


def _pass_at_k_interval_table(summary: dict) -> list[str]:
    """EOPD - OPD at every k of the curve: paired bootstrap interval and verdict."""
    claim = next((d for d in summary["directions"] if d["key"] == "pass_at_k"), {})
    rows = []
    for name, interval in (claim.get("intervals") or {}).items():
        if interval:
            rows.append([name.replace("pass", "Pass"), fmt_delta(interval["delta"], "pct").replace(" points", ""),
                         f"[{fmt_delta(interval['low'], 'pct').replace(' points', '')}, "
                         f"{fmt_delta(interval['high'], 'pct').replace(' points', '')}]",
                         fmt(interval["smallest_detectable"], "pct"), interval["verdict"]])
    if not rows:
        return []
    level = next(iter(claim["intervals"].values()))["level"]
    return _table(["k", "EOPD − OPD (points)", f"{100 * level:.0f}% interval (points)",
                   "smallest detectable (points)", "verdict"], rows, ["l", "r", "r", "r", "l"]) + [
        "", "Paired by seed (same teacher, student base and prompts), bootstrapped over seeds and problems; "
        "smallest detectable: the difference this budget finds with 80% probability.", ""]


def _ablation_lines(summary: dict) -> list[str]:
    """Each other setting against the paper's EOPD, paired by seed, and which is best at Pass@n."""
    rows_in = summary.get("ablation") or []
    if not rows_in:
        return []
    n = summary["config"]["eval_samples"]
    rows, best = [], ("EOPD (tau 0.8, top-16)", 0.0, None)
    for entry in rows_in:
        label = METHODS[entry["method"]].label
        cells = [label, fmt_spread(entry["gate_fraction_final"], "pct")]
        for key in ("pass@1", f"pass@{n}"):
            iv = entry[key]
            cells.append(f"{fmt_delta(iv['delta'], 'pct').replace(' points', '')} "
                         f"[{fmt_delta(iv['low'], 'pct').replace(' points', '')}, "
                         f"{fmt_delta(iv['high'], 'pct').replace(' points', '')}]: {iv['verdict']}" if iv else "–")
        rows.append(cells)
        top = entry[f"pass@{n}"]
        if top and top["delta"] > best[1]:
            best = (label, top["delta"], top)
    lines = ["### Against the paper's EOPD (tau 0.8, top-16)", ""]
    lines += _table(["setting", "share of tokens H > its tau, final (%)", "Pass@1 − EOPD's (points) [95%]",
                     f"Pass@{n} − EOPD's (points) [95%]"], rows, ["l", "r", "r", "r"])
    if best[2] is None:
        lines += ["", f"No setting beats the paper's EOPD at Pass@{n} in the mean.", ""]
    else:
        lines += ["", f"Best at Pass@{n}: {best[0]}, {fmt_delta(best[1], 'pct')} above the paper's EOPD in the mean "
                  f"({best[2]['verdict']}).", ""]
    return lines


def _room_lines(summary: dict) -> list[str]:
    """Whether Pass@k has room to differ: the references against issue 23's conditions."""
    checks = [c for c in summary.get("pass_at_k_room", []) if c["value"] is not None]
    if not checks:
        return []
    names = {"teacher": "teacher", "student_base": "student base"}
    parts = [f"{names[c['model']]} {c['metric'].replace('avg', 'Avg').replace('pass', 'Pass')} "
             f"{fmt(c['value'], 'pct')}% ({c['relation']} {100 * c['bound']:.0f}%: {'met' if c['met'] else 'NOT met'})"
             for c in checks]
    verdict = ("every condition is met, so Pass@k curves have room on both sides" if all(c["met"] for c in checks)
               else "not every condition is met: Pass@k is saturated or out of reach at some k, and a verdict "
                    "there says little")
    return ["", f"Room for a Pass@k effect: {'; '.join(parts)}. {verdict[0].upper() + verdict[1:]}.", ""]


def _results_table(summary: dict) -> list[str]:
    config = summary["config"]
    avg = f"avg@{config['eval_samples']}"
    passes = [f"pass@{k}" for k in config["ks"]]
    header = ["method", "seeds", "student entropy, first → final (nats)", "entropy retained (final / first)",
              "FKL on H > tau tokens, final (nats)", "share of tokens H > tau, final (%)",
              f"Avg@{config['eval_samples']} (%)"] + [f"Pass@{k} (%)" for k in config["ks"]]
    rows = []
    for method in config["methods"]:
        if method not in summary["per_method"]:
            continue
        m = summary["per_method"][method]
        rows.append([METHODS[method].label, str(len(m["seeds"])),
                     f"{fmt_spread(m['student_entropy_first'], 'nats')} → {fmt_spread(m['student_entropy_final'], 'nats')}",
                     fmt_spread(m["entropy_retained"], "ratio"), fmt_spread(m["fkl_gated_final"], "nats"),
                     fmt_spread(m["gate_fraction_final"], "pct"), fmt_spread(m[avg], "pct")]
                    + [fmt_spread(m[p], "pct") for p in passes])
    for name, label in (("student_base", "student base (before distillation)"), ("teacher", "teacher")):
        ref = summary["references"].get(name)
        if ref is not None:
            rows.append([label, "–", "–", "–", "–", "–", fmt(ref[avg], "pct")] + [fmt(ref[p], "pct") for p in passes])
    return _table(header, rows, ["l", "r"] + ["r"] * (len(header) - 2))


def _per_run_table(summary: dict) -> list[str]:
    config = summary["config"]
    avg = f"avg@{config['eval_samples']}"
    passes = [f"pass@{k}" for k in config["ks"]]
    header = ["run", "iterations", "entropy first → final", "FKL H > tau, final", "share H > tau (%)",
              f"Avg@{config['eval_samples']} (%)"] + [f"Pass@{k} (%)" for k in config["ks"]] + [
              "held-out samples cut at max tokens (%)", "train + eval (min)"]
    rows = []
    for r in summary["runs"]:
        s = r["scalars"]
        minutes = sum(r["timing"].values()) / 60 if r["timing"] else None
        rows.append([f"[{r['dir']}]({r['dir']}/)", str(len(r["iterations"])),
                     f"{fmt(s['student_entropy_first'], 'nats')} → {fmt(s['student_entropy_final'], 'nats')}",
                     fmt(s["fkl_gated_final"], "nats"), fmt(s["gate_fraction_final"], "pct"), fmt(s[avg], "pct")]
                    + [fmt(s[p], "pct") for p in passes] + [fmt(s.get("heldout_truncated"), "pct")]
                    + ["–" if minutes is None else f"{minutes:.1f}"])
    return _table(header, rows, ["l"] + ["r"] * (len(header) - 1))


def render_markdown(summary: dict, plots: dict) -> str:
    config = summary["config"]
    settings = summary["trainer_settings"]
    window = summary["runs"][0]["window"] if summary["runs"] else 1
    labels = ", ".join(METHODS[m].label for m in config["methods"])
    total_min = summary["timing"]["total_s"] / 60
    task = config.get("task", SOURCE)  # study.json files older than the task option ran the default task
    lines = [
        "# EOPD replication on the synthetic arithmetic task",
        "",
        f"Students distilled from one tiny teacher with {labels}: {len(config['seeds'])} seed(s) "
        f"({', '.join(map(str, config['seeds']))}) per method, {config['iterations']} iterations each "
        f"({settings.get('prompts_per_iteration', '?')} prompts per iteration, one rollout each), the same student "
        f"base and budget for every run. Held-out evaluation: the first {config['eval_problems']} problems of the "
        f"synthetic task `{task}`'s test split ({TASKS[task].description}), {config['eval_samples']} samples "
        f"each at temperature {config['eval_temperature']}, top-p {config['eval_top_p']} (the paper's evaluation sampling). "
        f"Recorded compute time of this study: {total_min:.1f} min.",
        "",
        "Numbers are **mean ± std over seeds** (sample standard deviation, n − 1); the per-seed values are in "
        "*Per run* and in `summary.json`. \"Final\" training values are means over the last "
        f"{window} iteration(s) of each run, \"first\" over the first {window}.",
        "",
    ]
    if summary["missing_runs"]:
        lines += [f"**Incomplete:** {len(summary['missing_runs'])} requested run(s) have no held-out evaluation "
                  f"yet and are left out: {', '.join(summary['missing_runs'])}. Rerun the same command to finish "
                  "them.", ""]
    lines += [f"## {SECTIONS[0]}", "",
              "Each verdict is computed from the numbers below: a direction *holds* when EOPD − OPD has the "
              "paper's sign, and is *beyond the seed spread* when its size exceeds the sum of the two methods' "
              "standard deviations over seeds.", ""]
    lines += _verdict_lines(summary)
    lines += ["", f"## {SECTIONS[1]}", ""]
    lines += _results_table(summary)
    lines += ["", f"Training columns are measured on each iteration's own rollouts (tau = {settings.get('tau')} "
              "nats on the teacher's entropy). Held-out columns are recomputed from every sample's grade in the "
              f"runs' `eval.json`; Avg@{config['eval_samples']} is the unbiased estimate of Avg@k for every "
              f"k ≤ {config['eval_samples']} and equals Pass@1.", ""]
    lines += _room_lines(summary)
    lines += _ablation_lines(summary)
    lines += [f"## {SECTIONS[2]}", ""]
    for key, filename, _, title in CURVES:
        lines += [f"![{title}]({plots[key]})", ""]
    lines += [f"## {SECTIONS[3]}", "", f"![Held-out Pass@k]({plots['pass_at_k']})", "",
              "Grey bars: the student base before distillation and the teacher (one evaluation each).", "",
              f"![Held-out Pass@k curves]({plots['pass_at_k_curves']})", ""]
    lines += _pass_at_k_interval_table(summary)
    lines += [f"## {SECTIONS[4]}", ""]
    lines += _per_run_table(summary)
    lines += ["", f"## {SECTIONS[5]}", ""]
    for method in config["methods"]:
        m = summary["methods"][method]
        overrides = ", ".join(f"`{o}`" for o in m["overrides"]) or "the preset's loss, no override"
        lines.append(f"- **{m['label']}** ({overrides}): {m['description']}.")
    lines += [
        f"- Trainer: the `tiny_cpu` preset (a 0.42M-parameter teacher made by SFT, a 0.21M-parameter student "
        f"base), tau = {settings.get('tau')}, alpha = {settings.get('alpha')}, top-{settings.get('topk')} "
        f"teacher distribution in the FKL, {settings.get('prompts_per_iteration')} prompts per iteration in "
        f"mini-batches of {settings.get('mini_batch_size')}, lr {settings.get('lr')} "
        + ("constant, " if settings.get('lr_schedule') == "constant" or settings.get('lr') == settings.get('min_lr')
           else f"{settings.get('lr_schedule') or 'cosine'} to {settings.get('min_lr')}, ") +
        f"rollouts with {settings.get('rollout_engine')} at temperature {settings.get('rollout_temperature')}, "
        f"top-p {settings.get('rollout_top_p')}, up to {settings.get('max_tokens')} tokens."
        + (f" Extra overrides for every run: {', '.join(f'`{o}`' for o in config['overrides'])}."
           if config["overrides"] else ""),
        "- Seeds change the prompt order and the rollout sampling; the teacher and the student base are the "
        "same for every run.",
        "- Training diagnostics are measured in each iteration's training forward passes, on the rollouts the "
        "student trains on (the student logits of each mini-batch before its optimizer step).",
        "- **Student token entropy**: mean over response tokens of the student's full-vocabulary entropy "
        "(nats) (`student_entropy` in `metrics.jsonl`).",
        "- **FKL on tokens above tau**: mean over response tokens whose teacher entropy exceeds tau of "
        f"KL(p̃ ‖ q), p̃ the teacher renormalised over its top-{settings.get('topk')}, q the student "
        "(`fkl_gated`), measured in every arm (OPD measures it without training on it). Iterations "
        "without any such token are left out.",
        "- **Share of tokens above tau**: fraction of response tokens whose teacher entropy exceeds tau "
        "(`gate_fraction`).",
        "- **Avg@n, Pass@k**: per-problem mean accuracy and the unbiased Pass@k estimator "
        "(1 − C(n−c, k)/C(n, k)), averaged over problems (`megatron_eopd/evaluation/metrics.py`).",
        f"- Curves are smoothed with a trailing mean over {max(1, config['iterations'] // 20)} iteration(s) before "
        "averaging over seeds; the tables use the raw values.",
        f"- Files: `{summary['files']['study']}` (settings), `runs/<method>-seed<k>/metrics.jsonl` and "
        "`eval.json`, `evals/teacher.json`, `evals/student_base.json`; `summary.json` holds every number above. "
        "`python tools/replicate.py --study-dir DIR --report-only` renders this report again from those files.",
        "",
    ]
    return "\n".join(lines)


def write_report(study_dir: Path) -> dict:
    """Summarise the study directory and write ``summary.json``, ``plots/*.png`` and ``report.md``; returns the summary."""
    study_dir = Path(study_dir)
    summary = summarize_study(study_dir)
    plot_dir = study_dir / PLOT_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    width = max(1, summary["config"]["iterations"] // 20)
    if summary["runs"]:
        for key, filename, ylabel, title in CURVES:
            plot_curves(summary, key, ylabel, title, plot_dir / filename, width)
            plots[key] = f"{PLOT_DIR}/{filename}"
        plot_pass_at_k(summary, plot_dir / "pass_at_k.png")
        plots["pass_at_k"] = f"{PLOT_DIR}/pass_at_k.png"
        plot_pass_at_k_curves(summary, plot_dir / "pass_at_k_curves.png")
        plots["pass_at_k_curves"] = f"{PLOT_DIR}/pass_at_k_curves.png"
    summary["plots"] = plots
    write_json(study_dir / SUMMARY_FILE, summary)
    if summary["runs"]:
        (study_dir / REPORT_FILE).write_text(render_markdown(summary, plots))
    else:
        (study_dir / REPORT_FILE).write_text("# EOPD replication on the synthetic arithmetic task\n\n"
                                             "No run has finished yet.\n")
    return summary
