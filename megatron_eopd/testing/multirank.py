"""Many multi-rank checks per process launch, with a pass/fail verdict per check.

Starting a gloo job and importing Megatron-Core costs ~20 s, so launching once per test would make
the suite crawl.  Instead a test module marks functions with :func:`multirank_check`; pytest
collects them as ordinary tests, and the first one that runs launches a single ``torchrun`` job
that executes every selected check in turn on all ranks (each under its own TP/PP layout).  Every
rank appends one JSON line per check to its own file, so a rank that dies or hangs leaves a clear
"no result from rank r" instead of taking the other verdicts with it.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

WORLD_SIZE = int(os.environ.get("EOPD_MULTIRANK_WORLD_SIZE", "4"))
LAUNCH_TIMEOUT_S = float(os.environ.get("EOPD_MULTIRANK_TIMEOUT_S", "1500"))
COLLECTIVE_TIMEOUT_S = float(os.environ.get("EOPD_MULTIRANK_COLLECTIVE_TIMEOUT_S", "180"))
# "cpu" (gloo) by default; "cuda" runs the same checks on NCCL with one GPU per rank.
DEVICE = os.environ.get("EOPD_MULTIRANK_DEVICE", "cpu")


def rank_environment(environ, device: str) -> dict:
    """The ranks' environment: one thread each unless set, unbuffered output, and for CPU ranks no
    visible GPU (the CPU compatibility layer refuses to run in a process that can use CUDA)."""
    env = dict(environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@dataclasses.dataclass(frozen=True)
class CheckSpec:
    check_id: str
    source_file: str
    function_name: str
    tp: int
    pp: int
    params: dict

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckContext:
    """What a check receives on every rank."""

    tp: int
    pp: int
    rank: int
    world_size: int
    tp_rank: int
    tp_group: Any
    pp_rank: int
    pp_group: Any
    dp_rank: int
    params: dict
    shared_dir: Path  # same directory on every rank of this check
    seed: int
    # Shared by every check of the launch and equal to MultirankResults.workdir in the pytest
    # process: checks leave artifacts here for each other and for main-process tests.
    launch_dir: Path


def _param_grid(params: dict[str, Iterable]) -> list[dict]:
    if not params:
        return [{}]
    keys = list(params)
    return [dict(zip(keys, values)) for values in itertools.product(*(params[k] for k in keys))]


def _check_id(source_file: str, name: str, tp: int, pp: int, params: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in params.items())
    label = f"tp{tp}-pp{pp}" + (f"-{extra}" if extra else "")
    return f"{Path(source_file).stem}::{name}[{label}]"


def fits_world_size(spec: CheckSpec, world_size: Optional[int] = None) -> bool:
    """Whether the check's TP*PP layout fits a launch of ``world_size`` ranks (default: this one's)."""
    return (world_size or WORLD_SIZE) % (spec.tp * spec.pp) == 0


def _misfit_reason(spec: CheckSpec) -> str:
    return (f"TP*PP = {spec.tp}*{spec.pp} does not divide the launch's world size {WORLD_SIZE} "
            f"(EOPD_MULTIRANK_WORLD_SIZE)")


def multirank_check(
    tp: int | Iterable[int] = 1,
    pp: int | Iterable[int] = 1,
    **params: Iterable,
):
    """Mark ``fn(ctx)`` as a check run on every rank of the shared launch.

    ``tp`` / ``pp`` (an int or a list) and any keyword lists expand into one check per
    combination, each reported as its own pytest test.
    """

    tps = [tp] if isinstance(tp, int) else list(tp)
    pps = [pp] if isinstance(pp, int) else list(pp)

    def decorate(fn: Callable[[CheckContext], Any]):
        source_file = inspect.getsourcefile(fn)
        specs = [
            CheckSpec(
                _check_id(source_file, fn.__name__, t, p, combo),
                source_file,
                fn.__name__,
                t,
                p,
                combo,
            )
            for t in tps
            for p in pps
            for combo in _param_grid(params)
        ]
        import pytest

        # A layout that does not fit this launch is a skipped test (e.g. TP=2 at world size 1).
        cases = [
            pytest.param(
                spec,
                id=spec.check_id.rsplit("[", 1)[1].rstrip("]"),
                marks=() if fits_world_size(spec) else pytest.mark.skip(reason=_misfit_reason(spec)),
            )
            for spec in specs
        ]

        @pytest.mark.multirank
        @pytest.mark.parametrize("multirank_spec", cases)
        def test(multirank_spec, multirank_results):
            multirank_results.assert_passed(multirank_spec)

        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        test.__wrapped_check__ = fn
        return test

    return decorate


class MultirankResults:
    """Launches the selected checks once and answers per-check verdicts."""

    def __init__(self, specs: list[CheckSpec], workdir: Path):
        # Skipped layouts never reach the launch (its ranks could not build them).
        self.specs = [s for s in specs if fits_world_size(s)]
        self.workdir = workdir
        self._launched = False
        self._verdicts: dict[str, dict[int, dict]] = {}
        self._launch_log = ""
        self._launch_rc: Optional[int] = None

    def _launch(self) -> None:
        self._launched = True
        plan = self.workdir / "plan.json"
        plan.write_text(json.dumps([s.to_json() for s in self.specs]))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD_SIZE}",
            "-m",
            "megatron_eopd.testing.multirank",
            "--plan",
            str(plan),
            "--out",
            str(self.workdir),
        ]
        env = rank_environment(os.environ, DEVICE)
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=LAUNCH_TIMEOUT_S,
            )
            self._launch_rc = proc.returncode
            self._launch_log = proc.stdout
        except subprocess.TimeoutExpired as exc:
            self._launch_rc = None
            self._launch_log = (exc.stdout or b"").decode(errors="replace") if isinstance(
                exc.stdout, bytes
            ) else (exc.stdout or "")
            self._launch_log += f"\n[multirank launch timed out after {LAUNCH_TIMEOUT_S:.0f} s]"
        for rank in range(WORLD_SIZE):
            path = self.workdir / f"rank{rank}.jsonl"
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                record = json.loads(line)
                self._verdicts.setdefault(record["check_id"], {})[rank] = record
        (self.workdir / "launch.log").write_text(self._launch_log)

    def assert_passed(self, spec: CheckSpec) -> None:
        import pytest

        if not self._launched:
            self._launch()
        per_rank = self._verdicts.get(spec.check_id, {})
        problems = []
        for rank in range(WORLD_SIZE):
            record = per_rank.get(rank)
            if record is None:
                problems.append(f"rank {rank}: no result (rank died or hung before this check)")
            elif not record["passed"]:
                problems.append(f"rank {rank}:\n{record['error']}")
        if problems:
            tail = self._launch_log[-4000:]
            pytest.fail(
                f"{spec.check_id} failed\n"
                + "\n".join(problems)
                + f"\n--- launch exit code {self._launch_rc}, log tail ---\n{tail}",
                pytrace=False,
            )


# --------------------------------------------------------------------------- worker side


def _load_check(spec: dict) -> Callable[[CheckContext], Any]:
    import importlib.util

    module_name = f"_multirank_{Path(spec['source_file']).stem}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, spec["source_file"])
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        # Test modules import helpers that sit next to them.
        sys.path.insert(0, str(Path(spec["source_file"]).parent))
        loader_spec.loader.exec_module(module)
    return getattr(module, spec["function_name"]).__wrapped_check__


def _worker_main(plan_path: str, out_dir: str) -> int:
    import torch
    import torch.distributed as dist

    from megatron_eopd.platform import distributed as platform_dist

    platform = platform_dist.init_distributed(device=DEVICE, timeout_s=COLLECTIVE_TIMEOUT_S)
    from megatron.core import parallel_state

    specs = json.loads(Path(plan_path).read_text())
    out_file = Path(out_dir) / f"rank{platform.rank}.jsonl"
    failures = 0
    with out_file.open("a") as sink:
        for index, spec in enumerate(specs):
            error = None
            try:
                platform_dist.init_model_parallel(spec["tp"], spec["pp"], seed=1234 + index)
                seed = 1000 + index
                torch.manual_seed(seed)
                shared_dir = Path(out_dir) / f"check{index:04d}"
                shared_dir.mkdir(exist_ok=True)
                ctx = CheckContext(
                    tp=spec["tp"],
                    pp=spec["pp"],
                    rank=platform.rank,
                    world_size=platform.world_size,
                    tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                    pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                    pp_group=parallel_state.get_pipeline_model_parallel_group(),
                    dp_rank=parallel_state.get_data_parallel_rank(),
                    params=spec["params"],
                    shared_dir=shared_dir,
                    seed=seed,
                    launch_dir=Path(out_dir),
                )
                _load_check(spec)(ctx)
                # A rank must not run ahead into the next check's collectives.
                dist.barrier()
            except BaseException:  # noqa: BLE001 - report every failure, keep going
                error = traceback.format_exc()
                failures += 1
            sink.write(json.dumps({"check_id": spec["check_id"], "passed": error is None, "error": error}) + "\n")
            sink.flush()
    platform_dist.shutdown()
    # Verdicts live in the per-rank files; a non-zero exit here would make torchrun kill the
    # ranks that are still writing theirs.
    print(f"rank {platform.rank}: {len(specs) - failures}/{len(specs)} checks passed", flush=True)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="multi-rank check worker (launched by torchrun)")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.exit(_worker_main(args.plan, args.out))
