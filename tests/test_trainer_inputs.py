"""The trainer's front door: bad input through the real CLI, dry runs of the paper presets without
their weights, and a teacher whose weights hold a NaN.

Bad input must stop the run with exit status 2 and one line on stderr naming the problem (no
traceback), before the run directory is touched.  A dry run prints the resolved config and the
layout (the memory plan is :func:`estimate_memory_gib`'s, and its weight terms match parameter
counts written out here from the Qwen3 model shapes).  A NaN in the teacher stops the first
iteration with exit status 3, naming the iteration and the statistic, before the student changes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from megatron_eopd.rollout.engine import vllm_importable

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tools" / "train_eopd.py"
GIB = 1024**3

# One small EOPD iteration on the tiny task models (in-process HF sampler, no vLLM).
TINY_RUN = ["rollout.engine=hf", "train.iterations=1", "train.prompts_per_iteration=2", "train.mini_batch_size=2",
            "train.micro_batch_size=2", "rollout.sampling.max_tokens=8", "checkpoint.export_final_hf=false",
            "logging.tensorboard=false", "logging.progress=false", "data.limit=16"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny student and teacher of the synthetic task, and teachers that do not fit the student."""
    from megatron_eopd.data.synthetic import make_task_model
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    root = tmp_path_factory.mktemp("models")
    student = make_task_model(root / "student", role="student", seed=1)
    teacher = make_task_model(root / "teacher", role="teacher", seed=2)
    vocab = json.loads((student / "config.json").read_text())["vocab_size"]
    # The word-level test tokenizer: another vocabulary (301 entries) ...
    word_teacher = make_tiny_qwen3(root / "word_teacher", seed=3, hidden_size=32, num_layers=1, num_heads=1,
                                   num_kv_heads=1, ffn_hidden_size=32)
    # ... and the same tokenizer padded to the student's vocabulary size: same width, other tokens.
    same_size = make_tiny_qwen3(root / "word_teacher_same_size", seed=3, vocab_size=vocab, hidden_size=32,
                                num_layers=1, num_heads=1, num_kv_heads=1, ffn_hidden_size=32)
    bad_jsonl = root / "bad.jsonl"
    bad_jsonl.write_text('{"id": "a", "problem": "Add 1, 2 and 3.", "answer": "6"}\n{"id": "b", "problem": oops\n')
    return {"student": student, "teacher": teacher, "word_teacher": word_teacher, "vocab": vocab,
            "word_teacher_same_size": same_size, "bad_jsonl": bad_jsonl, "root": root}


def _tiny(models, run_dir, *extra):
    return ["--config", "tiny_cpu", f"student.hf_dir={models['student']}", f"teacher.hf_dir={models['teacher']}",
            f"run.dir={run_dir}", *TINY_RUN, *extra]


def _listing(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


# --------------------------------------------------------------------------- the CLI runs, launched together

# Bad input on the tiny models (a real run that must stop before it starts):
# name: (extra arguments, what the one line on stderr must say).
BAD_INPUTS = {
    "unknown key": (["train.bogus=1"], ["unknown config key(s) in 'train': bogus"]),
    "wrong type": (["train.iterations=abc"], ["train.iterations", "expected an integer", "'abc'"]),
    "missing student dir": (["student.hf_dir={root}/nowhere"], ["student.hf_dir=", "nowhere", "no config.json"]),
    "missing teacher dir": (["teacher.hf_dir={root}/nowhere"], ["teacher.hf_dir=", "nowhere", "no config.json"]),
    "teacher vocabulary differs": (["teacher.hf_dir={word_teacher}"],
                                   ["vocabularies differ", "student vocab_size={vocab}", "teacher vocab_size=301"]),
    "teacher tokenizer differs": (["teacher.hf_dir={word_teacher_same_size}"],
                                  ["teacher tokenizer", "differs from the student's", "word_teacher_same_size"]),
    "missing jsonl": (["data.source={root}/absent.jsonl"], ["absent.jsonl: no such file"]),
    "malformed jsonl": (["data.source={bad_jsonl}"], ["bad.jsonl:2: invalid JSON"]),
    "warm-up longer than the run": (["optim.warmup_steps=5"],
                                    ["optim.warmup_steps = 5 must be below the run's 1 optimizer steps"]),
}
# Dry runs of the 0.6B preset at layouts it cannot take.
BAD_LAYOUTS = {
    "world size not divisible": (["--world-size", "3", "parallel.tensor=2"],
                                 ["world size 3 is not divisible by parallel.tensor * parallel.pipeline = 2 * 1"]),
    "tp does not divide heads": (["--world-size", "3", "parallel.tensor=3"],
                                 ["parallel.tensor=3", "TP=3 does not divide num_attention_heads=16"]),
}
# More of the same, through cli.main in this process (the subprocess cases above show the entry point
# adds nothing to main's exit status and stderr).
MORE_BAD_LAYOUTS = {
    "tp does not divide the heads (from config.json)": (
        ["--world-size", "2", "parallel.tensor=2", "student.arch=null", "student.hf_dir={student}"],
        ["student at parallel.tensor=2", "TP=2 does not divide num_attention_heads=3"]),
    "engines do not fit the node": (
        ["--world-size", "4"], ["rollout engines at world size 4", "engines_per_node=8 does not divide the 4 ranks"]),
    "warm-up longer than the run": (["--world-size", "8", "train.iterations=1", "optim.warmup_steps=4"],
                                    ["optim.warmup_steps = 4 must be below the run's 4 optimizer steps"]),
}
# vLLM-CPU runs without chunked prefill, so its step budget must hold a whole sequence: refused at start-up.
ENGINE_REFUSED = ["rollout.engine=vllm", "rollout.max_model_len=256", "rollout.max_num_batched_tokens=128"]
# Qwen3 shapes (the models' config.json): hidden, layers, heads, kv heads, head dim, FFN, tied.
QWEN3_SHAPES = {
    "Qwen3-0.6B": (1024, 28, 16, 8, 128, 3072, True),
    "Qwen3-1.7B": (2048, 28, 16, 8, 128, 6144, True),
    "Qwen3-4B": (2560, 36, 32, 8, 128, 9728, True),
    "Qwen3-8B": (4096, 36, 32, 8, 128, 12288, False),
}
QWEN3_VOCAB = 151936
PRESETS = {
    # preset: (world size, student arch, TP, DP, nodes, engines, micro-batches per step)
    "eopd_qwen3_0.6b": (8, "Qwen3-0.6B", 1, 8, 1, 8, 1),
    "eopd_qwen3_1.7b": (8, "Qwen3-1.7B", 1, 8, 1, 8, 2),
    "eopd_qwen3_4b": (16, "Qwen3-4B", 2, 8, 2, 8, 2),
}


def _fill(items, models):
    values = {k: str(v) for k, v in models.items()}
    return [item.format(**values) for item in items]


@pytest.fixture(scope="module")
def cli_runs(models, tmp_path_factory):
    """Every CLI case of this module as a real subprocess (``tools/train_eopd.py``), a few at a time.

    Returns name -> (CompletedProcess, the directory it ran in, the run.dir it was given).
    """
    jobs = {}
    for name, (extra, _) in BAD_INPUTS.items():
        where = tmp_path_factory.mktemp("bad_input")
        jobs[f"input: {name}"] = (_tiny(models, where / "run", *_fill(extra, models)), where, where / "run")
    for name, (extra, _) in BAD_LAYOUTS.items():
        where = tmp_path_factory.mktemp("bad_layout")
        jobs[f"layout: {name}"] = (["--config", "eopd_qwen3_0.6b", "--dry-run", *_fill(extra, models)], where,
                                   where / "runs")
    for preset in PRESETS:
        where = tmp_path_factory.mktemp("dry_run")  # holds no checkpoints/: the presets' weights are absent
        # No --world-size: a dry run plans the preset's own nodes x GPUs.
        jobs[f"dry run: {preset}"] = (["--config", preset, "--dry-run"], where, where / "runs")
    where = tmp_path_factory.mktemp("tiny_dry_run")  # a fresh clone: make run has not prepared the models
    jobs["dry run: tiny_cpu"] = (["--config", "tiny_cpu", "--dry-run"], where, where / "runs")
    where = tmp_path_factory.mktemp("real_run")
    jobs["real run: eopd_qwen3_0.6b"] = (["--config", "eopd_qwen3_0.6b"], where, where / "runs")
    if vllm_importable():
        where = tmp_path_factory.mktemp("engine_refused")
        jobs["engine refused"] = (_tiny(models, where / "run", *ENGINE_REFUSED), where, where / "run")

    # A stray LOCAL_WORLD_SIZE (a process that ran vLLM in-process keeps one) must not change the plan a
    # dry run makes for another launch: CI once failed every preset's dry run on exactly that.
    env = {**os.environ, "LOCAL_WORLD_SIZE": "1"}
    env.pop("WORLD_SIZE", None)

    def launch(args, cwd):
        return subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=300, env=env)

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(launch, args, cwd) for name, (args, cwd, _) in jobs.items()}
        return {name: (futures[name].result(), cwd, run_dir) for name, (_, cwd, run_dir) in jobs.items()}


def _assert_one_line_error(proc, expected):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("train_eopd: error: ")
    for part in expected:
        assert part in lines[0], (part, lines[0])


# --------------------------------------------------------------------------- bad input: exit 2, one line


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, models, cli_runs):
    proc, _, run_dir = cli_runs[f"input: {case}"]
    _assert_one_line_error(proc, _fill(BAD_INPUTS[case][1], models))
    assert not run_dir.exists()


def _main_in_process(args, capsys, monkeypatch, cwd):
    from megatron_eopd.trainer import cli

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = cli.main(args)
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


@pytest.mark.parametrize("extra,expected", [
    (["optim.warmup_steps=5"], ["optim.warmup_steps = 5"]),  # the last of the up-front checks
    (["parallel.tensor=2"], ["world size 1 is not divisible"]),  # TP wider than the launch
])
def test_bad_input_leaves_an_existing_run_directory_as_it_was(extra, expected, models, tmp_path, capsys,
                                                             monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("kept")
    proc = _main_in_process(_tiny(models, run_dir, *extra), capsys, monkeypatch, tmp_path)
    _assert_one_line_error(proc, expected)
    assert _listing(run_dir) == ["checkpoints", "notes.txt"] and (run_dir / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_dry_run_refuses_impossible_layouts(case, cli_runs):
    proc, _, run_dir = cli_runs[f"layout: {case}"]
    _assert_one_line_error(proc, BAD_LAYOUTS[case][1])
    assert not run_dir.exists()


@pytest.mark.parametrize("case", list(MORE_BAD_LAYOUTS))
def test_dry_run_refuses_more_impossible_layouts(case, models, tmp_path, capsys, monkeypatch):
    extra, expected = MORE_BAD_LAYOUTS[case]
    proc = _main_in_process(["--config", "eopd_qwen3_0.6b", "--dry-run", *_fill(extra, models)], capsys,
                            monkeypatch, tmp_path)
    _assert_one_line_error(proc, expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.vllm
def test_a_rollout_engine_that_cannot_start_exits_4_with_one_line(cli_runs):
    """A rollout engine failure (here vLLM-CPU refusing a step budget below the context length) is exit
    status 4 and one line naming the engine's problem and where the next start continues, no traceback."""
    from megatron_eopd.rollout.vllm_engine import _vllm_on_cpu

    if "engine refused" not in cli_runs:
        pytest.skip("vllm is not importable in this environment")
    if not _vllm_on_cpu():
        pytest.skip("the budget's floor is vLLM-CPU's")
    proc, _, _ = cli_runs["engine refused"]
    assert proc.returncode == 4, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train_eopd")]
    assert lines == ["train_eopd: error: the vLLM-CPU engine cannot start with max_num_batched_tokens=128 below "
                     "max_model_len=256: it runs without chunked prefill (per-request seeds need that on CPU), so "
                     "one engine step must hold a whole sequence; no checkpoint was written yet; the same command "
                     "starts the run again"], proc.stderr[-3000:]


# --------------------------------------------------------------------------- dry runs of the paper presets


def test_dry_run_of_tiny_preset_names_how_to_prepare_its_models(cli_runs):
    proc, _, run_dir = cli_runs["dry run: tiny_cpu"]
    _assert_one_line_error(proc, ["student.hf_dir='runs/tiny_cpu/assets/student_base' holds no config.json",
                                  "tools/run_tiny.py --prepare-only", "make run"])
    assert not run_dir.exists()


def _qwen3_parameters(name):
    hidden, layers, heads, kv, head_dim, ffn, tied = QWEN3_SHAPES[name]
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 2 * head_dim  # q, o, k, v, q/k norms
    per_layer = attention + 3 * hidden * ffn + 2 * hidden  # gate/up/down, two RMSNorms
    return layers * per_layer + QWEN3_VOCAB * hidden * (1 if tied else 2) + hidden


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dry_run_of_paper_presets_without_weights(preset, cli_runs):
    from megatron_eopd.config import to_dict
    from megatron_eopd.models.qwen3 import QWEN3_PRESETS
    from megatron_eopd.trainer.config import estimate_memory_gib, load_train_config

    world, arch, tp, dp, nodes, engines, micro_batches = PRESETS[preset]
    proc, cwd, run_dir = cli_runs[f"dry run: {preset}"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    config_text, layout_text = proc.stdout.split("# parallel layout\n")
    assert config_text.startswith("# resolved config\n")
    config = load_train_config(preset)
    assert yaml.safe_load(config_text) == to_dict(config)
    assert not (cwd / config.student.hf_dir).exists() and not (cwd / config.teacher.hf_dir).exists()
    assert not run_dir.exists()

    layout = yaml.safe_load(layout_text)
    assert {k: layout[k] for k in ("world_size", "tensor_parallel", "pipeline_parallel", "data_parallel", "nodes",
                                   "rollout_engines", "responses_per_iteration", "optimizer_steps_per_iteration",
                                   "micro_batches_per_step")} == {
        "world_size": world, "tensor_parallel": tp, "pipeline_parallel": 1, "data_parallel": dp, "nodes": nodes,
        "rollout_engines": engines, "responses_per_iteration": 128, "optimizer_steps_per_iteration": 4,
        "micro_batches_per_step": micro_batches}
    assert dp * config.train.micro_batch_size * micro_batches == config.train.mini_batch_size
    assert "counted when the data loads" in layout["iterations"]
    engine_tp = config.rollout.tensor_parallel_size
    assert layout["rollout_engine_gpus"] == [",".join(str(g) for g in range(first, first + engine_tp))
                                             for first in range(0, 8, 8 // config.rollout.engines_per_node)]
    assert len(layout["rollout_engine_gpus"]) * nodes == engines

    memory = layout["expected_memory_per_gpu_gib"]
    assert memory == estimate_memory_gib(config, QWEN3_PRESETS[arch], QWEN3_PRESETS["Qwen3-8B"], tp, 1, dp)
    # The weight terms from parameter counts written out from the shapes above.
    student, teacher = _qwen3_parameters(arch), _qwen3_parameters("Qwen3-8B")
    assert memory["student_weights_and_grads"] == pytest.approx(student / tp * 6 / GIB, abs=0.006)
    assert memory["optimizer_states"] == pytest.approx(student / tp * 12 / dp / GIB, abs=0.006)
    assert memory["teacher_weights"] == pytest.approx(teacher / tp * 2 / GIB, abs=0.006)
    assert math.isclose(teacher / 1e9, 8.19, abs_tol=0.01)  # Qwen3-8B: 8.2B parameters
    parts = [v for k, v in memory.items() if not k.startswith("peak")]
    assert memory["peak_while_training"] == pytest.approx(sum(parts), abs=0.05)
    assert memory["peak_while_training"] < 80 and memory["peak_while_sampling"] < 80


def test_memory_plan_with_full_recompute():
    """``train.recompute=full``: a stage keeps each layer's bf16 input plus one layer's activations."""
    from megatron_eopd.config import ConfigError
    from megatron_eopd.models.qwen3 import QWEN3_PRESETS
    from megatron_eopd.trainer.config import estimate_memory_gib, load_train_config

    student, teacher = QWEN3_PRESETS["Qwen3-4B"], QWEN3_PRESETS["Qwen3-8B"]
    stored = load_train_config("eopd_qwen3_4b")
    recomputed = load_train_config("eopd_qwen3_4b", ["train.recompute=full"])
    assert (stored.train.recompute, recomputed.train.recompute) == ("none", "full")
    tp, pp, dp = 2, 2, 4
    tokens = stored.train.micro_batch_size * (stored.data.max_prompt_tokens + stored.rollout.sampling.max_tokens)
    one_layer = 34 * student.hidden_size * tokens / tp
    without = estimate_memory_gib(stored, student, teacher, tp, pp, dp)
    with_recompute = estimate_memory_gib(recomputed, student, teacher, tp, pp, dp)
    layers_per_stage = student.num_layers // pp
    assert without["student_activations"] == pytest.approx(one_layer * layers_per_stage / GIB, abs=0.006)
    assert with_recompute["student_activations"] == pytest.approx(
        (2 * student.hidden_size * tokens * layers_per_stage + one_layer) / GIB, abs=0.006)
    assert with_recompute["student_activations"] < without["student_activations"] / 5
    assert {k: v for k, v in with_recompute.items() if "activations" not in k and "peak" not in k} == {
        k: v for k, v in without.items() if "activations" not in k and "peak" not in k}
    with pytest.raises(ConfigError, match="train.recompute"):
        load_train_config("eopd_qwen3_4b", ["train.recompute=selective"])


def test_memory_plan_of_the_loss_follows_the_fused_output_layer():
    """Fused (the default): one block of logits, its gradient and an fp32 copy, plus the fp32 weight-gradient
    accumulator; unfused, or a loss that reads full logits: the micro-batch's logits shard and its gradient."""
    from megatron_eopd.models.qwen3 import QWEN3_PRESETS, padded_vocab_size
    from megatron_eopd.objective.fused_head import DEFAULT_BLOCK_ELEMENTS
    from megatron_eopd.trainer.config import estimate_memory_gib, load_train_config

    student, teacher, tp = QWEN3_PRESETS["Qwen3-1.7B"], QWEN3_PRESETS["Qwen3-8B"], 2
    shard = padded_vocab_size(student.vocab_size, tp) // tp
    fused = load_train_config("eopd_qwen3_1.7b")
    tokens = fused.train.micro_batch_size * (fused.data.max_prompt_tokens + fused.rollout.sampling.max_tokens)
    block_rows = DEFAULT_BLOCK_ELEMENTS["cuda"] // shard
    assert 1 < block_rows < tokens  # the block is a real part of the micro-batch
    plan = estimate_memory_gib(fused, student, teacher, tp, 1, 4)
    assert "logits_shards" not in plan
    assert plan["output_layer_blocks"] == pytest.approx(
        (block_rows * shard * 8 + shard * student.hidden_size * 4) / GIB, abs=0.006)
    for overrides in (["train.fused_output_layer=false"], ["loss.fkl_mode=full"]):
        plan = estimate_memory_gib(load_train_config("eopd_qwen3_1.7b", overrides), student, teacher, tp, 1, 4)
        assert "output_layer_blocks" not in plan, overrides
        assert plan["logits_shards"] == pytest.approx(2 * tokens * shard * 2 / GIB, abs=0.006), overrides


def test_real_run_of_a_preset_still_needs_the_weights(cli_runs):
    proc, _, run_dir = cli_runs["real run: eopd_qwen3_0.6b"]
    _assert_one_line_error(proc, ["student.hf_dir='checkpoints/Qwen3-0.6B-Base'", "no config.json"])
    assert not run_dir.exists()


# --------------------------------------------------------------------------- a NaN in the teacher


def _nan_copy(src: Path, dst: Path) -> Path:
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    reloaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    assert torch.isnan(reloaded.model.layers[1].mlp.down_proj.weight).sum() == 1
    return dst


def test_nan_in_teacher_stops_iteration_1_and_keeps_the_student(models, tmp_path, monkeypatch):
    """In process through the CLI and the real loop: exit 3 with one line naming iteration 1 and the
    teacher statistics; no checkpoint; the student's parameters bit-for-bit as loaded.  Then, with
    the same session, the student-side guard: NaN teacher statistics fed to the update name the
    iteration, the step and the loss term, and the optimizer does not step."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_eopd.data import qwen3_templates
    from megatron_eopd.platform import shutdown
    from megatron_eopd.trainer import cli, loop, phases
    from megatron_eopd.trainer.batch import Sample
    from megatron_eopd.trainer.student import NonFiniteError
    from megatron_eopd.trainer.teacher import score_teacher

    nan_teacher = _nan_copy(Path(models["teacher"]), tmp_path / "nan_teacher")
    run_dir = tmp_path / "run"
    seen = {}
    real_open = loop.open_session

    def open_and_remember(config, *, resume=False):
        session = real_open(config, resume=resume)
        seen["session"] = session
        seen["before"] = {n: p.detach().clone() for n, p in session.student.chunks[0].named_parameters()}
        return session

    monkeypatch.setattr(loop, "open_session", open_and_remember)
    started = not dist.is_initialized()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = cli.main(_tiny(models, run_dir, f"teacher.hf_dir={nan_teacher}"))
        assert code == cli.EXIT_NON_FINITE == 3
        lines = [line for line in stderr.getvalue().splitlines() if line.startswith("train_eopd")]
        assert len(lines) == 1 and "Traceback" not in stderr.getvalue()
        assert lines[0].startswith("train_eopd: stopped: iteration 1: non-finite teacher statistics (entropy, ")
        assert "stopped before this iteration's student update" in lines[0]
        session = seen["session"]
        after = dict(session.student.chunks[0].named_parameters())
        assert seen["before"].keys() == after.keys() and len(after) > 5
        assert all(torch.equal(seen["before"][n], after[n]) for n in after)
        assert not any((run_dir / "checkpoints").iterdir())
        assert not (run_dir / "final_hf").exists()

        # The student-side guard on its own: hand-made responses, the NaN teacher's statistics unchecked.
        special = session.special
        items = session.stream.next_batch(2)
        answer = session.tokenizer.encode("1+2=3. \\boxed{3}", add_special_tokens=False)
        samples = [Sample(i, list(item.prompt_ids), session.teacher_encode(item.record.problem),
                          answer + [special.endoftext],
                          list(qwen3_templates.teacher_view_of_response(answer + [special.endoftext], special)),
                          [0.0] * (len(answer) + 1), "stop") for i, item in enumerate(items)]
        steps = phases.make_steps(session, samples)
        with pytest.raises(NonFiniteError, match=r"^iteration 7: non-finite teacher statistics \(entropy"):
            phases.teacher_statistics(session, steps, 7)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        unchecked = [score_teacher(session.teacher, step, session.config.loss, tp_group=tp_group,
                                   true_vocab_size=session.vocab_size) for step in steps]
        scheduler_steps = session.student.scheduler.num_steps
        with pytest.raises(NonFiniteError, match=r"^iteration 7, optimizer step 0: non-finite loss term loss_rkl"):
            phases.student_update(session, steps, unchecked, 7)
        assert session.student.scheduler.num_steps == scheduler_steps
        after = dict(session.student.chunks[0].named_parameters())
        assert all(torch.equal(seen["before"][n], after[n]) for n in after)
    finally:
        if started:
            shutdown()
