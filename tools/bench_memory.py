#!/usr/bin/env python
"""Peak resident memory of the conversion tools, the teacher's loading and the trainer, against
what each process must hold (issue 20, item 3): a benchmark that prints a table, not a test.

How memory is read (Linux ``/proc/<pid>/status``):

- ``VmHWM``: the kernel's own peak of the resident set, anonymous and file-backed pages together;
- ``RssAnon``: anonymous pages (tensors, Python heaps) - what the process itself allocated;
- ``RssFile``: file-backed pages mapped into the process.  safetensors files are read through
  ``mmap``, so every page of a weights file that has been touched counts here while the file is
  open, although the kernel can drop those pages at any time (they are page cache, not allocations).

Every measured process samples its own ``RssAnon``/``RssFile`` every 20 ms from a thread (a peak
of anonymous memory is not kept by the kernel) and reports ``VmHWM`` at the end; the bounds of the
issue apply to the anonymous peak, and ``VmHWM`` is shown next to it.  Under torchrun every rank is
a measured process of its own.  Any other process the job starts (a vLLM engine core, a checkpoint
writer) is sampled from outside (``RssAnon`` and ``VmHWM`` of every descendant).

Sub-commands (each prints rows of the README's table; ``--work`` holds the large files):

    convert   Qwen3-8B-shaped bf16: HF -> Megatron (--tp 2) and back, as one process and as 2 ranks,
              and checks each round trip bit for bit;
    teacher   a rank loading a Qwen3-1.7B-shaped teacher at TP1 and TP2;
    trainer   the trainer at TP1 and TP2 with Qwen3-0.6B / 1.7B shapes, marks after the models are
              built, after the first optimizer step and while the engine is awake.

Run every sub-command under ``flock /work/exp/bigmem.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_eopd.testing import proc_memory  # noqa: E402 (after the path)

GIB = 1024**3


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def run_measured(command: list, *, env_extra: dict | None = None, log: Path | None = None,
                 interval: float = 0.25, timeout: float = 3600) -> dict:
    """Run ``command``; return its marks (from the measured processes' stderr) and, for every process
    it started, the sampled peak RssAnon and the last VmHWM seen."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    log = log or Path(os.devnull)
    start = time.time()
    with open(log, "w") as sink:
        proc = subprocess.Popen([str(c) for c in command], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        seen: dict[int, dict] = {}
        while proc.poll() is None:
            for pid in proc_memory.descendants(proc.pid):
                status = proc_memory.status(pid)
                if not status:
                    continue
                info = seen.setdefault(pid, {"pid": pid, "cmd": _comm(pid), "peak_anon": 0, "vm_hwm": 0,
                                             "peak_private": 0})
                info["peak_anon"] = max(info["peak_anon"], status.get("RssAnon", 0))
                info["peak_private"] = max(info["peak_private"], proc_memory.private_dirty(pid))
                info["vm_hwm"] = max(info["vm_hwm"], status.get("VmHWM", 0))
            if time.time() - start > timeout:
                proc.kill()
                raise TimeoutError(f"{command} ran over {timeout} s")
            time.sleep(interval)
    return {"rc": proc.returncode, "seconds": time.time() - start, "marks": read_marks(log),
            "processes": list(seen.values())}


def read_marks(log: Path) -> list[dict]:
    """The marks in a log; ranks share it, so a mark may start in the middle of another rank's line."""
    if log == Path(os.devnull):
        return []
    text, decoder, marks = Path(log).read_text(errors="replace"), json.JSONDecoder(), []
    at = text.find(proc_memory.MARK)
    while at >= 0:
        try:
            marks.append(decoder.raw_decode(text, at + len(proc_memory.MARK))[0])
        except json.JSONDecodeError:
            pass  # cut by another rank's output: that mark is lost
        at = text.find(proc_memory.MARK, at + len(proc_memory.MARK))
    return marks


def torchrun(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


# --------------------------------------------------------------------------- measured entry points


def _watched(argv: list[str]) -> int:
    """``_watched MODULE:FUNCTION ARGS...``: run a ``main(argv)`` under a :class:`~megatron_eopd.testing.proc_memory.SelfWatch`."""
    watch = proc_memory.SelfWatch()
    target, args = argv[0], argv[1:]
    module, _, function = target.partition(":")
    import importlib

    watch.mark("start")
    rc = getattr(importlib.import_module(module), function)(args)
    watch.mark("end", rc=rc)
    return rc


def _rank_shard_bytes(arch, tp: int, itemsize: int) -> int:
    """Bytes of one TP rank's Megatron parameters (vocabulary padded; norms replicated, the rest split)."""
    from megatron_eopd.models.qwen3.architecture import padded_vocab_size
    from megatron_eopd.models.qwen3.mapping import expected_hf_shapes

    total = 0
    padded = padded_vocab_size(arch.vocab_size, tp)
    for name, shape in expected_hf_shapes(arch).items():
        numel = 1
        for d in shape:
            numel *= d
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            numel = numel // shape[0] * padded
        total += numel if name.endswith("norm.weight") else numel // tp
    return total * itemsize


def _compare_hf(a: Path, b: Path) -> str:
    """Bit-for-bit comparison of two HF directories, one tensor in memory at a time."""
    from megatron_eopd.checkpoint.safetensors_io import HFSafetensors, first_difference

    difference = first_difference(a, b)
    return f"DIFFERENT: {difference}" if difference else f"bit-identical ({len(HFSafetensors(a))} tensors)"


# --------------------------------------------------------------------------- rows


ROWS: list[dict] = []


def _row(what: str, command: str, result: dict, must_hold: dict, note: str = "") -> None:
    """One table row per measured rank of ``result``; ``must_hold``: rank -> bytes it must hold."""
    if result["rc"] != 0:
        ROWS.append({"what": what, "process": "-", "note": f"FAILED rc={result['rc']}", "command": command})
        return
    ends = [m for m in result["marks"] if m["label"] == "end"]
    ranks = {m["pid"] for m in result["marks"]}
    for mark in sorted(ends, key=lambda m: m["rank"]):
        hold = must_hold[mark["rank"]]
        ROWS.append({"what": what, "process": f"rank {mark['rank']}" if len(ends) > 1 else "the process",
                     "must_hold": hold, "peak_anon": mark["peak_anon"], "peak_file": mark["peak_file"],
                     "vm_hwm": mark["vm_hwm"], "ratio": mark["peak_anon"] / hold, "note": note,
                     "command": command, "seconds": result["seconds"]})
    others = [p for p in result["processes"] if p["pid"] not in ranks and p["peak_anon"] > 256 * 1024**2]
    for other in others:
        ROWS.append({"what": what, "process": f"other: {other['cmd'][:50]}", "peak_anon": other["peak_anon"],
                     "vm_hwm": other["vm_hwm"], "command": command,
                     "note": f"of which private (not shared with its parent) {gib(other['peak_private'])} GiB"})
    print(json.dumps(ROWS[-1]), file=sys.stderr, flush=True)


def print_table() -> None:
    print("| run | process | must hold (GiB) | peak RssAnon (GiB) | anon / must hold | peak RssFile (GiB) | VmHWM (GiB) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        hold = gib(r["must_hold"]) if r.get("must_hold") else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        print(f"| {r['what']} | {r['process']} | {hold} | {gib(r.get('peak_anon', 0))} | {ratio} | "
              f"{gib(r.get('peak_file', 0))} | {gib(r.get('vm_hwm', 0))} | {r.get('note', '')} |")
    print()
    for command in dict.fromkeys(r["command"] for r in ROWS):
        print(f"    {command}")


# --------------------------------------------------------------------------- convert


def bench_convert(args) -> None:
    from megatron_eopd.checkpoint.random_qwen3 import resolve_arch

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = work / f"hf-{args.arch}"
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, REPO / "tools/make_qwen3.py", "--arch", args.arch, "--dtype", "bf16",
                        "--output", hf, *(["--num-layers", str(args.num_layers)] if args.num_layers else [])],
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    arch = resolve_arch(args.arch, args.num_layers)
    watched = [sys.executable, "tools/bench_memory.py", "_watched"]
    to_mcore = "megatron_eopd.checkpoint.convert:hf_to_mcore_main"
    to_hf = "megatron_eopd.checkpoint.convert:mcore_to_hf_main"
    for nproc in args.nproc:
        launch = watched if nproc == 1 else torchrun(nproc) + ["tools/bench_memory.py", "_watched"]
        must = {r: _rank_shard_bytes(arch, nproc, 2) for r in range(nproc)}  # a plain process converts at TP1
        mc, back = work / f"mcore-{nproc}", work / f"back-{nproc}"
        how = "one process" if nproc == 1 else f"torchrun, {nproc} ranks"
        cmd = launch + [to_mcore, "--hf-dir", hf, "--output", mc, "--tp", "2", "--overwrite"]
        result = run_measured(cmd, log=work / f"to_mcore-{nproc}.log")
        _row(f"HF -> Megatron, {how}", _show(cmd), result, must)
        cmd = launch + [to_hf, "--mcore-dir", mc, "--output", back, "--overwrite",
                        *(["--tp", str(nproc)] if nproc > 1 else [])]
        result = run_measured(cmd, log=work / f"to_hf-{nproc}.log")
        verdict = _compare_hf(hf, back) if result["rc"] == 0 else "not compared"
        _row(f"Megatron -> HF, {how}", _show(cmd), result, must, note=f"round trip {verdict}")
        if not args.keep:
            import shutil

            shutil.rmtree(mc, ignore_errors=True)
            shutil.rmtree(back, ignore_errors=True)


# --------------------------------------------------------------------------- teacher


def _teacher_rank(argv: list[str]) -> int:
    """``_teacher TP DTYPE HF_DIR [CHECKPOINT]``: one rank builds and loads the teacher as the trainer does."""
    watch = proc_memory.SelfWatch()
    tp, dtype_name, hf_dir = int(argv[0]), argv[1], argv[2]
    checkpoint = argv[3] if len(argv) > 3 else None
    import torch

    from megatron_eopd.platform import init_distributed, init_model_parallel
    from megatron_eopd.platform.distributed import shutdown
    from megatron_eopd.trainer.config import ModelSpec
    from megatron_eopd.trainer.models import build_teacher

    init_distributed()
    init_model_parallel(tp, 1)
    before = watch.mark("before loading")
    chunks = build_teacher(ModelSpec(hf_dir=hf_dir, checkpoint=checkpoint),
                           {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name])
    hold = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    watch.mark("end", must_hold=hold, before_anon=before["now_anon"])
    shutdown()
    return 0


def bench_teacher(args) -> None:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    # The hub's weights are bf16; the trainer on CPU holds them in fp32 (the default --dtype here).
    hf = work / f"hf-1.7b{f'-{args.num_layers}l' if args.num_layers else ''}"
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, REPO / "tools/make_qwen3.py", "--arch", "1.7b", "--dtype", "bf16",
                        "--output", hf, *(["--num-layers", str(args.num_layers)] if args.num_layers else [])],
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    sources = {"HF safetensors": []}
    if args.checkpoint:
        mc = work / f"mcore-{hf.name}-{args.dtype}"
        if not (mc / "eopd_checkpoint.json").is_file():
            subprocess.run([sys.executable, REPO / "tools/convert_hf_to_mcore.py", "--hf-dir", hf, "--output", mc,
                            "--dtype", args.dtype], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        sources["Megatron checkpoint"] = [mc]
    for source, extra in sources.items():
        for tp in args.tp:
            launch = [sys.executable] if tp == 1 else torchrun(tp)
            cmd = launch + ["tools/bench_memory.py", "_teacher", str(tp), args.dtype, hf, *extra]
            result = run_measured(cmd, log=work / f"teacher-tp{tp}-{len(extra)}.log")
            ends = {m["rank"]: m for m in result["marks"] if m["label"] == "end"}
            must = {r: m["must_hold"] for r, m in ends.items()}
            bound = {r: f"bound 1.25 x shard + 1 GiB = {gib(1.25 * h + GIB)} GiB; "
                        f"{'within' if ends[r]['peak_anon'] <= 1.25 * h + GIB else 'OVER'}; "
                        f"anon before loading {gib(ends[r]['before_anon'])} GiB" for r, h in must.items()}
            n_before = len(ROWS)
            _row(f"teacher Qwen3-1.7B ({args.dtype} params) from {source}, TP{tp}", _show(cmd), result, must)
            for row in ROWS[n_before:]:
                if row["process"].startswith(("rank", "the process")):
                    rank = int(row["process"].split()[1]) if row["process"].startswith("rank") else 0
                    row["note"] = bound[rank]


# --------------------------------------------------------------------------- trainer


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _trainer_rank(argv: list[str]) -> int:
    """``_trainer OVERRIDES...``: ``train_eopd.py --config tiny_cpu OVERRIDES`` with memory marks."""
    watch = proc_memory.SelfWatch()
    import torch

    from megatron_eopd.trainer import cli, loop, rollouts, student

    sizes: dict = {}
    open_session, optimizer_step = loop.open_session, student.optimizer_step
    wake_up, generate = rollouts.RolloutFleet.wake_up, rollouts.RolloutFleet.generate
    steps = {"n": 0}

    def measured_open_session(*args, **kwargs):
        watch.mark("before the session (imports only)")
        session = open_session(*args, **kwargs)
        params = [p for c in session.student.chunks for p in c.parameters()]
        sizes["student_weights"] = _tensor_bytes(p.data for p in params)
        sizes["student_grads"] = sum(b.grad_data.numel() * b.grad_data.element_size()
                                     for c in session.student.chunks for b in getattr(c, "buffers", []))
        sizes["teacher_weights"] = _tensor_bytes(p.data for c in session.teacher or [] for p in c.parameters())
        sizes["student_params"] = sum(p.numel() for p in params)
        watch.mark("models built", **sizes)
        return session

    def measured_optimizer_step(opt, *args, **kwargs):
        out = optimizer_step(opt, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 1:
            states = [v for st in _optimizer_states(opt.optimizer) for v in st.values() if torch.is_tensor(v)]
            sizes["optimizer_states"] = _tensor_bytes(states)
            sizes["optimizer_master"] = _master_bytes(opt.optimizer)
            watch.mark("first optimizer step", **sizes)
        return out

    def measured_wake_up(self):
        watch.mark("before waking the engine")
        return wake_up(self)

    def measured_generate(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        watch.mark("engine awake (woken, sampled)")
        return out

    loop.open_session, student.optimizer_step = measured_open_session, measured_optimizer_step
    rollouts.RolloutFleet.wake_up, rollouts.RolloutFleet.generate = measured_wake_up, measured_generate
    rc = cli.main(["--config", "tiny_cpu", *argv])
    watch.mark("end", rc=rc, **sizes)
    return rc


def _optimizer_states(optimizer) -> list:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [st for o in inner for st in getattr(o, "optimizer", o).state.values()]


def _master_bytes(optimizer) -> int:
    """fp32 master copies the optimizer keeps beside the model's parameters (none when these are fp32)."""
    total = 0
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(o, "fp32_from_float16_groups", []) or []:
            total += _tensor_bytes(group)
    return total


def bench_trainer(args) -> None:
    from megatron_eopd.models.qwen3.architecture import QWEN3_PRESETS
    from megatron_eopd.trainer.config import estimate_memory_gib, load_train_config

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in Path(args.problems).read_text().splitlines() if line.strip()]
    problems = work / "train_shortest.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: len(r["problem"]))[:4]))
    for layers in args.layers:
        pair = {}
        for role, arch, kind, seed in (("student", "0.6b", "base", 1), ("teacher", "1.7b", "instruct", 2)):
            pair[role] = work / f"{role}-{arch}-{layers}l"
            if not (pair[role] / "config.json").is_file():
                subprocess.run([sys.executable, REPO / "tools/make_qwen3.py", "--arch", arch, "--num-layers", str(layers),
                                "--dtype", "fp32", "--kind", kind, "--seed", str(seed), "--output", pair[role]],
                               check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        for tp in args.tp:
            run_dir = work / f"run-{layers}l-tp{tp}"
            overrides = [f"run.dir={run_dir}", f"student.hf_dir={pair['student']}", f"teacher.hf_dir={pair['teacher']}",
                         "teacher.prompt_style=chat_non_thinking", f"data.source={problems}",
                         f"parallel.tensor={tp}", "train.iterations=1", "train.prompts_per_iteration=4",
                         "train.mini_batch_size=4", "train.micro_batch_size=4", "rollout.sampling.n=2",
                         "rollout.sampling.max_tokens=32", f"rollout.engine={args.engine}",
                         "checkpoint.export_final_hf=false", "logging.tensorboard=false", "logging.progress=false"]
            launch = [sys.executable] if tp == 1 else torchrun(tp)
            cmd = launch + ["tools/bench_memory.py", "_trainer", *overrides]
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            result = run_measured(cmd, log=work / f"trainer-{layers}l-tp{tp}.log", timeout=1500)
            config = load_train_config("tiny_cpu", overrides)
            student = dataclasses.replace(QWEN3_PRESETS["Qwen3-0.6B"], num_layers=layers)
            teacher = dataclasses.replace(QWEN3_PRESETS["Qwen3-1.7B"], num_layers=layers)
            plan = estimate_memory_gib(config, student, teacher, tp, 1, 1)
            TRAINER.append({"layers": layers, "tp": tp, "result": result, "plan": plan,
                            "command": _show(cmd), "student": student, "teacher": teacher})
            print(json.dumps({"layers": layers, "tp": tp, "rc": result["rc"], "marks": result["marks"],
                              "processes": result["processes"], "plan": plan}), file=sys.stderr, flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)


TRAINER: list[dict] = []


def print_trainer_table() -> None:
    """Marks per rank, then the weight / gradient / optimizer terms against the plan recomputed for fp32."""
    if not TRAINER:
        return
    print("| depth | TP | rank | imports only: anon (GiB) | models built: anon | first optimizer step: anon peak | "
          "engine awake: anon peak | VmHWM | peak RssFile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in TRAINER:
        by_rank: dict = {}
        for m in t["result"]["marks"]:
            by_rank.setdefault(m["rank"], {})[m["label"]] = m
        for rank, marks in sorted(by_rank.items()):
            built = marks.get("models built", {})
            step = marks.get("first optimizer step", {})
            awake = marks.get("engine awake (woken, sampled)", {})
            end = marks.get("end", {})
            base = marks.get("before the session (imports only)", {})
            print(f"| {t['layers']} | {t['tp']} | {rank} | {gib(base.get('now_anon', 0))} | {gib(built.get('now_anon', 0))} | "
                  f"{gib(step.get('window_peak_anon', 0))} | {gib(awake.get('window_peak_anon', 0))} | "
                  f"{gib(end.get('vm_hwm', 0))} | {gib(end.get('peak_file', 0))} |")
        for other in t["result"]["processes"]:
            if other["pid"] not in {m["pid"] for m in t["result"]["marks"]} and other["peak_anon"] > 256 * 1024**2:
                print(f"| {t['layers']} | {t['tp']} | other: {other['cmd'][:40]} | | | | peak anon {gib(other['peak_anon'])}, "
                      f"private {gib(other['peak_private'])} | {gib(other['vm_hwm'])} | |")
    print()
    # estimate_memory_gib plans bf16 weights (2 B) + fp32 gradients (4 B) and 12 B of optimizer state per
    # parameter, bf16 teacher weights; the same layout in fp32: 4 B + 4 B, 12 B, 4 B.
    print("| depth | TP | rank 0 term | measured (GiB) | estimate_memory_gib, recomputed for fp32 (GiB) | measured / plan |")
    print("|---|---|---|---|---|---|")
    for t in TRAINER:
        end = next((m for m in t["result"]["marks"] if m["label"] == "end" and m["rank"] == 0), None)
        if end is None:
            continue
        plan = t["plan"]
        terms = {
            "student weights + gradients": (end.get("student_weights", 0) + end.get("student_grads", 0),
                                            plan["student_weights_and_grads"] * 8 / 6 * GIB),
            "optimizer states": (end.get("optimizer_states", 0) + end.get("optimizer_master", 0),
                                 plan["optimizer_states"] * GIB),
            "teacher weights": (end.get("teacher_weights", 0), plan["teacher_weights"] * 2 * GIB),
        }
        for term, (value, planned) in terms.items():
            print(f"| {t['layers']} | {t['tp']} | {term} | {gib(value)} | {gib(planned)} | {value / planned:.2f} |")
    print()
    for t in TRAINER:
        print(f"    {t['command']}")


def _show(cmd: list) -> str:
    text = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_watched":
        return _watched(argv[1:])
    if argv and argv[0] == "_trainer":
        return _trainer_rank(argv[1:])
    if argv and argv[0] == "_teacher":
        return _teacher_rank(argv[1:])
    p = argparse.ArgumentParser(prog="bench_memory", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("convert", help="HF <-> Megatron conversion of a Qwen3-8B-shaped bf16 model")
    c.add_argument("--arch", default="8b")
    c.add_argument("--num-layers", type=int, default=None)
    c.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    c.add_argument("--keep", action="store_true", help="keep the converted directories")
    t = sub.add_parser("teacher", help="a rank loading a Qwen3-1.7B-shaped teacher at TP1 and TP2")
    t.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    t.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    t.add_argument("--num-layers", type=int, default=None, help="fewer layers (a smoke test of this script)")
    t.add_argument("--checkpoint", action="store_true", help="also load it from a converted Megatron checkpoint")
    r = sub.add_parser("trainer", help="the trainer at TP1 and TP2, Qwen3-0.6B student and 1.7B teacher (fp32)")
    r.add_argument("--layers", type=int, nargs="+", default=[28])
    r.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    r.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    r.add_argument("--problems", default=str(REPO.parent / "shared/data/math/train_math.jsonl"))
    for s in (c, t, r):
        s.add_argument("--work", type=Path, required=True, help="directory for the large files")
    args = p.parse_args(argv)
    {"convert": bench_convert, "teacher": bench_teacher, "trainer": bench_trainer}[args.what](args)
    print_table()
    print_trainer_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
