"""Every number of the report, read back from the runs' own files and aggregated over seeds.

Nothing here trains or samples: :func:`summarize_study` reads ``study.json``, each run's
``metrics.jsonl`` (written by the trainer, one object per iteration) and ``eval.json`` (per-sample
``correct`` flags), and the references' evaluations, and returns the summary the report renders.
Editing one of those files and rendering again changes the report accordingly.

Definitions (per run, then over seeds):

* training diagnostics, from ``metrics.jsonl``, measured on the iteration's own rollouts while the
  student trains on them: ``student_entropy`` (mean full-vocabulary entropy of the student over
  response tokens), ``gate_fraction`` (share of response tokens whose teacher entropy exceeds tau),
  ``fkl_gated`` (mean top-k forward KL over those tokens; undefined in an iteration without any,
  where the trainer writes 0, so such iterations are left out).  A run's *first* and *final* value
  of each is its mean over the first and the last ``ceil(final_fraction * iterations)`` iterations;
* held-out metrics, recomputed from ``eval.json``: ``avg@n`` and the unbiased ``pass@k``;
* over seeds: mean, sample standard deviation (n - 1 in the denominator; none for one seed), min, max.

A direction of the paper *holds* when the difference of the EOPD and OPD means has the paper's
sign; it is *beyond the seed spread* when its size exceeds the sum of the two standard deviations
(the mean +- std intervals of the two methods do not overlap).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import fmean, stdev
from typing import Any, Optional, Sequence

import numpy as np

from megatron_eopd.evaluation import runner
from megatron_eopd.replication import intervals
from megatron_eopd.replication.study import (
    EVAL_FILE,
    HELDOUT,
    METHODS,
    STUDY_FILE,
    TIMING_FILE,
    StudyConfig,
    read_study_config,
    requested_runs,
)

TRAINING_METRICS = ("student_entropy", "fkl_gated", "gate_fraction", "teacher_entropy")


def read_metrics(path: Path) -> list[dict]:
    """``metrics.jsonl`` as a list of records sorted by iteration."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["iteration"])


def training_value(record: dict, key: str) -> Optional[float]:
    """``record[key]``, or None where it is missing or undefined (FKL on high-entropy tokens without any)."""
    value = record.get(key)
    if value is None or not math.isfinite(float(value)):
        return None
    if key == "fkl_gated" and not record.get("gate_fraction"):
        return None
    return float(value)


def window_size(iterations: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * iterations))


def mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def heldout_metrics(eval_path: Path) -> dict:
    """Avg@n and Pass@k of the held-out split recomputed from the per-sample flags of an evaluation JSON."""
    report = json.loads(Path(eval_path).read_text())
    return runner.recompute_metrics(report)[HELDOUT]


def read_run(run_dir: Path, method: str, seed: int, config: StudyConfig, study_dir: Path) -> dict:
    """One finished run: curves, first/final windows, held-out metrics, timing, and where each came from."""
    records = read_metrics(run_dir / "metrics.jsonl")
    curves = {key: [training_value(r, key) for r in records] for key in TRAINING_METRICS}
    window = window_size(len(records), config.final_fraction)
    first = {key: mean_of(values[:window]) for key, values in curves.items()}
    final = {key: mean_of(values[-window:]) for key, values in curves.items()}
    graded = json.loads((run_dir / EVAL_FILE).read_text())["results"]
    correct = runner.correctness(graded)[HELDOUT]
    heldout = runner.recompute_metrics({"results": graded})[HELDOUT]
    timing_path = run_dir / TIMING_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    scalars = {
        "student_entropy_first": first["student_entropy"],
        "student_entropy_final": final["student_entropy"],
        "entropy_retained": (final["student_entropy"] / first["student_entropy"]
                             if first["student_entropy"] and final["student_entropy"] is not None else None),
        "fkl_gated_final": final["fkl_gated"],
        "gate_fraction_final": final["gate_fraction"],
        "teacher_entropy_final": final["teacher_entropy"],
        **{key: heldout[key] for key in heldout_keys(config)},
        # Held-out samples cut off at max_tokens: how a student that learned not to stop shows itself.
        "heldout_truncated": truncated_fraction(graded[HELDOUT]),
    }
    relative = run_dir.relative_to(study_dir) if run_dir.is_relative_to(study_dir) else run_dir
    return {
        "method": method, "seed": seed, "dir": str(relative),
        "iterations": [r["iteration"] for r in records], "window": window,
        "curves": curves, "scalars": scalars, "num_problems": int(heldout["num_problems"]),
        "samples_per_problem": int(heldout["n"]), "timing": timing,
        "correct_per_problem": [sum(row) for row in correct],
        "pass_at_k_curve": pass_at_k_curve(heldout),
        "problem_ids": [str(row.get("id")) for row in graded[HELDOUT]],
        "files": {"metrics": str(relative / "metrics.jsonl"), "eval": str(relative / EVAL_FILE)},
    }


def truncated_fraction(rows: Sequence[dict]) -> Optional[float]:
    """Share of samples whose generation hit max_tokens (None where the samples do not say)."""
    reasons = [sample.get("finish_reason") for row in rows for sample in row["samples"]]
    if not reasons or any(r is None for r in reasons):
        return None
    return sum(r == "length" for r in reasons) / len(reasons)


def pass_at_k_curve(heldout: dict) -> dict:
    """Held-out Pass@k at k = 1, 2, 4, ... up to the number of samples per problem."""
    ks = intervals.pass_at_k_curve_ks(int(heldout["n"]))
    return {"k": ks, "values": [float(heldout[f"pass@{k}"]) for k in ks]}


def aggregate_pass_at_k_curves(runs: Sequence[dict]) -> dict:
    """Per k, the mean, min and max over the runs (seeds), and each run's curve."""
    ks = runs[0]["pass_at_k_curve"]["k"]
    if any(r["pass_at_k_curve"]["k"] != ks for r in runs):
        raise ValueError("the runs were evaluated with different numbers of samples per problem")
    per_seed = [r["pass_at_k_curve"]["values"] for r in runs]
    columns = list(zip(*per_seed))
    return {"k": ks, "mean": [fmean(c) for c in columns], "min": [min(c) for c in columns],
            "max": [max(c) for c in columns], "seeds": [r["seed"] for r in runs], "per_seed": per_seed}


def heldout_keys(config: StudyConfig) -> list[str]:
    return [f"avg@{config.eval_samples}"] + [f"pass@{k}" for k in config.ks]


def spread(values: Sequence[Optional[float]]) -> dict:
    """Mean, sample std (None for fewer than 2 values), min, max and the values themselves."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": list(values)}
    return {"n": len(present), "mean": fmean(present), "std": stdev(present) if len(present) > 1 else None,
            "min": min(present), "max": max(present), "values": list(values)}


def aggregate_curves(runs: Sequence[dict], key: str) -> dict:
    """Per iteration, the spread of ``key`` over the runs (seeds) that have it."""
    length = max((len(r["curves"][key]) for r in runs), default=0)
    out = {"iteration": [], "mean": [], "std": [], "min": [], "max": [], "n": []}
    for i in range(length):
        s = spread([r["curves"][key][i] for r in runs if i < len(r["curves"][key])])
        out["iteration"].append(i + 1)
        for field in ("mean", "std", "min", "max", "n"):
            out[field].append(s[field])
    return out


DIRECTIONS = (
    {"key": "entropy", "metric": "student_entropy_final", "better": "higher",
     "claim": "EOPD sustains the student's token entropy better than OPD",
     "quantity": "final student token entropy (nats)"},
    {"key": "fkl_high_entropy", "metric": "fkl_gated_final", "better": "lower",
     "claim": "EOPD has a lower forward KL on high-entropy tokens than OPD",
     "quantity": "final FKL on tokens with teacher entropy > tau (nats)"},
    {"key": "pass_at_k", "metric": "pass@8", "better": "higher",
     "claim": "EOPD has a higher held-out Pass@k than OPD",
     "quantity": "held-out Pass@8"},
)


def compare(eopd: dict, opd: dict, better: str) -> dict:
    """EOPD against OPD on one quantity: difference, direction, and whether it exceeds the seed spread."""
    if eopd["mean"] is None or opd["mean"] is None:
        return {"status": "not assessable", "holds": None, "beyond_spread": None, "delta": None}
    delta = eopd["mean"] - opd["mean"]
    signed = delta if better == "higher" else -delta
    both_spread = eopd["std"] is not None and opd["std"] is not None
    spread_sum = eopd["std"] + opd["std"] if both_spread else None
    beyond = abs(delta) > spread_sum if both_spread else None
    e_vals = [v for v in eopd["values"] if v is not None]
    o_vals = [v for v in opd["values"] if v is not None]
    separated = (min(e_vals) > max(o_vals)) if better == "higher" else (max(e_vals) < min(o_vals))
    if signed == 0:
        status = "no difference"
    elif beyond is None:
        status = ("holds in the mean (one seed: spread unknown)" if signed > 0
                  else "does not hold (reversed in the mean; one seed: spread unknown)")
    elif signed > 0:
        status = "holds, beyond the seed spread" if beyond else "holds in the mean, within the seed spread"
    else:
        status = "reversed, beyond the seed spread" if beyond else "does not hold (reversed in the mean, within the seed spread)"
    return {"status": status, "holds": signed > 0, "beyond_spread": beyond, "delta": delta,
            "relative": delta / abs(opd["mean"]) if opd["mean"] else None, "spread_sum": spread_sum,
            "every_seed_separated": separated if (e_vals and o_vals and len(e_vals) + len(o_vals) > 2) else None}


def directions(per_method: dict, config: StudyConfig, runs: Optional[Sequence[dict]] = None) -> list[dict]:
    """The paper's three claims, each with the seed-spread comparison and (given the runs) the paired
    bootstrap interval of :mod:`.intervals` and its verdict."""
    out = []
    for spec in DIRECTIONS:
        entry = dict(spec)
        if "eopd" not in per_method or "opd" not in per_method:
            entry.update(status="not assessed (the study needs both the OPD and the EOPD runs)", holds=None)
            out.append(entry)
            continue
        metric = spec["metric"]
        if spec["key"] == "pass_at_k":
            metric = f"pass@{max(config.ks)}"
            entry["quantity"] = f"held-out Pass@{max(config.ks)}"
            entry["per_k"] = {f"pass@{k}": compare(per_method["eopd"][f"pass@{k}"], per_method["opd"][f"pass@{k}"],
                                                   "higher") for k in config.ks}
        entry["metric"] = metric
        entry["eopd"], entry["opd"] = per_method["eopd"][metric], per_method["opd"][metric]
        entry.update(compare(entry["eopd"], entry["opd"], spec["better"]))
        if runs is not None:
            if spec["key"] == "pass_at_k":
                # The verdict at every k of the curve, and at the configured ones.
                curve_ks = intervals.pass_at_k_curve_ks(config.eval_samples)
                entry["intervals"] = {f"pass@{k}": pass_at_k_interval(runs, k)
                                      for k in sorted(set(curve_ks) | set(config.ks))}
                entry["interval"] = entry["intervals"][metric]
            else:
                entry["interval"] = scalar_interval(runs, spec["metric"], spec["better"])
        out.append(entry)
    return out


def paired_seeds(runs: Sequence[dict], a: str = "eopd", b: str = "opd") -> list[int]:
    """Seeds with a run of both methods, in order: the pairs every interval is computed over."""
    seeds = {m: {r["seed"] for r in runs if r["method"] == m} for m in (a, b)}
    return sorted(seeds[a] & seeds[b])


def _run_of(runs: Sequence[dict], method: str, seed: int) -> dict:
    return next(r for r in runs if r["method"] == method and r["seed"] == seed)


def pass_at_k_interval(runs: Sequence[dict], k: int, a: str = "eopd", b: str = "opd") -> Optional[dict]:
    """``a`` minus ``b`` in per-problem Pass@k, paired by seed, bootstrapped over seeds and problems."""
    seeds = paired_seeds(runs, a, b)
    if not seeds:
        return None
    arrays = {}
    for method in (a, b):
        rows = []
        for seed in seeds:
            run = _run_of(runs, method, seed)
            if run["problem_ids"] != _run_of(runs, b, seed)["problem_ids"]:
                raise ValueError(f"{run['dir']} was evaluated on other held-out problems than the {b} run of "
                                 f"seed {seed}: the runs cannot be paired (evaluate them on the same split)")
            rows.append(intervals.per_problem_pass_at_k(run["correct_per_problem"], run["samples_per_problem"], k))
        arrays[method] = np.stack(rows)
    return intervals.paired_interval(arrays[a], arrays[b], "higher").to_dict()


def scalar_interval(runs: Sequence[dict], metric: str, better: str, a: str = "eopd",
                    b: str = "opd") -> Optional[dict]:
    """``a`` minus ``b`` in a per-run quantity, paired by seed, bootstrapped over seeds."""
    pairs = [(_run_of(runs, a, s)["scalars"].get(metric), _run_of(runs, b, s)["scalars"].get(metric))
             for s in paired_seeds(runs, a, b)]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if not pairs:
        return None
    return intervals.paired_interval(np.array([x for x, _ in pairs]), np.array([y for _, y in pairs]),
                                     better).to_dict()


def ablation(runs: Sequence[dict], config: StudyConfig) -> list[dict]:
    """Every other method against the paper's EOPD (tau 0.8, top-16), paired by seed: held-out Avg@n
    (= Pass@1) and Pass@n, with the gate fraction each produces."""
    if not any(r["method"] == "eopd" for r in runs):
        return []
    n = config.eval_samples
    out = []
    for method in config.methods:
        if method == "eopd" or not paired_seeds(runs, method, "eopd"):
            continue
        out.append({"method": method, "pass@1": pass_at_k_interval(runs, 1, method, "eopd"),
                    f"pass@{n}": pass_at_k_interval(runs, n, method, "eopd"),
                    "gate_fraction_final": spread([r["scalars"]["gate_fraction_final"] for r in runs
                                                   if r["method"] == method])})
    return out


def reference_metrics(study_dir: Path) -> dict:
    """The teacher's and the student base's held-out metrics (recomputed), where evaluated."""
    out = {}
    for name in ("teacher", "student_base"):
        path = Path(study_dir) / "evals" / f"{name}.json"
        if path.is_file():
            out[name] = {**heldout_metrics(path), "file": str(path.relative_to(study_dir))}
    return out


# Issue 23's conditions for Pass@k curves with room on both sides, at n samples per problem: the teacher
# solves most samples but not all and nearly every problem in n; the student base leaves problems unsolved.
ROOM_CONDITIONS = (("teacher", "avg", "at most", 0.8), ("teacher", "pass", "at least", 0.95),
                   ("student_base", "pass", "at most", 0.8))


def pass_at_k_room(references: dict, samples: int) -> list[dict]:
    """Each condition of :data:`ROOM_CONDITIONS` read from the references' Avg@n / Pass@n: met or not."""
    out = []
    for model, metric, relation, bound in ROOM_CONDITIONS:
        key = f"{metric}@{samples}"
        value = references.get(model, {}).get(key)
        met = None if value is None else (value <= bound if relation == "at most" else value >= bound)
        out.append({"model": model, "metric": key, "relation": relation, "bound": bound, "value": value, "met": met})
    return out


def summarize_study(study_dir: Path) -> dict[str, Any]:
    """The whole summary, from the study directory's files alone."""
    study_dir = Path(study_dir)
    config = read_study_config(study_dir)
    runs, missing = [], []
    for method, seed, run_dir in requested_runs(config, study_dir):
        if (run_dir / EVAL_FILE).is_file() and (run_dir / "metrics.jsonl").is_file():
            runs.append(read_run(run_dir, method, seed, config, study_dir))
        else:
            missing.append(str(run_dir.relative_to(study_dir)))
    per_method, curves, pass_curves = {}, {}, {}
    scalar_keys = list(runs[0]["scalars"]) if runs else []
    for method in config.methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        per_method[method] = {key: spread([r["scalars"][key] for r in mine]) for key in scalar_keys}
        per_method[method]["seeds"] = [r["seed"] for r in mine]
        curves[method] = {key: aggregate_curves(mine, key) for key in TRAINING_METRICS}
        pass_curves[method] = aggregate_pass_at_k_curves(mine)
    timing_path = study_dir / TIMING_FILE
    study_timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    run_seconds = sum(sum(r["timing"].values()) for r in runs)
    references = reference_metrics(study_dir)
    return {
        "study_dir": str(study_dir),
        "config": config.to_dict(),
        "methods": {m: {"label": METHODS[m].label, "description": METHODS[m].description,
                        "overrides": list(METHODS[m].overrides)} for m in config.methods},
        "trainer_settings": trainer_settings(runs, study_dir),
        "runs": runs,
        "missing_runs": missing,
        "per_method": per_method,
        "curves": curves,
        "pass_at_k_curves": pass_curves,
        "references": references,
        "pass_at_k_room": pass_at_k_room(references, config.eval_samples),
        "directions": directions(per_method, config, runs),
        "ablation": ablation(runs, config),
        "timing": {"study": study_timing, "runs_s": run_seconds,
                   "total_s": run_seconds + sum(study_timing.values())},
        "files": {"study": STUDY_FILE},
    }


def trainer_settings(runs: Sequence[dict], study_dir: Path) -> dict:
    """The loss and budget the first run actually trained with (from its resolved ``config.yaml``)."""
    import yaml

    if not runs:
        return {}
    path = Path(study_dir) / runs[0]["dir"] / "config.yaml"
    if not path.is_file():
        return {}
    resolved = yaml.safe_load(path.read_text())
    train, loss, optim = resolved.get("train", {}), resolved.get("loss", {}), resolved.get("optim", {})
    sampling = resolved.get("rollout", {}).get("sampling", {})
    return {"tau": loss.get("tau"), "alpha": loss.get("alpha"), "topk": loss.get("topk"),
            "prompts_per_iteration": train.get("prompts_per_iteration"),
            "mini_batch_size": train.get("mini_batch_size"), "lr": optim.get("lr"), "min_lr": optim.get("min_lr"),
            "lr_schedule": optim.get("lr_schedule"),
            "rollout_engine": resolved.get("rollout", {}).get("engine"),
            "rollout_temperature": sampling.get("temperature"), "rollout_top_p": sampling.get("top_p"),
            "max_tokens": sampling.get("max_tokens")}
