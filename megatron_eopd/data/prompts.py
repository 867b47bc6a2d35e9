"""Prompt records and the resumable prompt stream the trainer draws its batches from.

Records come from a local JSON Lines file (schema ``{"id", "problem", "answer", "source"}``), the
synthetic arithmetic task (``synthetic:arith``), or a Hugging Face dataset (hub name or local path).
The stream tokenizes each prompt once, drops over-long ones, and walks seeded per-epoch shuffles.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_eopd.errors import EOPDError

SYNTHETIC_PREFIX = "synthetic:"


class DataError(EOPDError, ValueError):
    """Prompt data that cannot be used as given; the message names the file, line and problem."""


@dataclass(frozen=True)
class PromptRecord:
    """One problem with its gold final answer (without ``\\boxed{}``)."""

    id: str
    problem: str
    answer: str
    source: str


@dataclass(frozen=True)
class PromptItem:
    """A record with its prompt token ids, as the stream hands it out."""

    record: PromptRecord
    prompt_ids: Tuple[int, ...]


def load_prompt_records(
    source: str,
    *,
    split: str = "train",
    problem_key: str = "problem",
    answer_key: str = "answer",
    id_key: str = "id",
    limit: Optional[int] = None,
) -> List[PromptRecord]:
    """Records from ``source``: a ``.jsonl`` file, ``synthetic:arith``, or a Hugging Face dataset.

    A Hugging Face ``source`` is a hub name or a local directory (``save_to_disk`` output or data
    files) loaded with ``datasets``; ``split`` picks its split.  Rows without ``id_key`` get
    ``"<split>-<index>"``.  ``limit`` keeps the first rows.  Bad input raises :class:`DataError`.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    if source.startswith(SYNTHETIC_PREFIX):
        records = _synthetic_records(source, split, limit)
        where = source
    elif source.endswith(".jsonl"):
        records = _jsonl_records(Path(source), problem_key, answer_key, id_key, limit)
        where = source
    else:
        records = _hf_records(source, split, problem_key, answer_key, id_key, limit)
        where = f"{source} (split {split!r})"
    if not records:
        raise DataError(f"{where}: no prompt records")
    return records


def _synthetic_records(source: str, split: str, limit: Optional[int]) -> List[PromptRecord]:
    from megatron_eopd.data import synthetic

    try:
        synthetic.get_task(source)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if split not in ("train", "test"):
        raise DataError(f"{source}: split must be 'train' or 'test', got {split!r}")
    return synthetic.task_records(split, n=limit, source=source)


def _field(row: Dict[str, Any], key: str, where: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _record(row: Any, where: str, problem_key: str, answer_key: str, id_key: str,
            default_id: str, default_source: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    # Integer ids and answers are common in public sets; anything else non-string is an error.
    row = {k: str(v) if k in (id_key, answer_key) and isinstance(v, int) and not isinstance(v, bool) else v
           for k, v in row.items()}
    record_id = _field(row, id_key, where) if id_key in row else default_id
    source = _field(row, "source", where) if "source" in row else default_source
    return PromptRecord(
        id=record_id,
        problem=_field(row, problem_key, where),
        answer=_field(row, answer_key, where),
        source=source,
    )


def _jsonl_records(path: Path, problem_key: str, answer_key: str, id_key: str,
                   limit: Optional[int]) -> List[PromptRecord]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records: List[PromptRecord] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
            records.append(_record(row, where, problem_key, answer_key, id_key,
                                   default_id=f"{path.stem}-{line_no}", default_source=path.stem))
            if limit is not None and len(records) >= limit:
                break
    return records


def _hf_records(source: str, split: str, problem_key: str, answer_key: str, id_key: str,
                limit: Optional[int]) -> List[PromptRecord]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{source}: loading a Hugging Face dataset needs the 'datasets' package ({exc}); "
            "install it, or give a local .jsonl file"
        ) from None
    path = Path(source)
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{source}: no split {split!r}; has {sorted(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs the source named
        raise DataError(f"{source}: cannot load as a Hugging Face dataset, split {split!r} "
                        f"({type(exc).__name__}: {exc})") from None
    records: List[PromptRecord] = []
    for index, row in enumerate(loaded):
        if limit is not None and index >= limit:
            break
        records.append(_record(row, f"{source} [{split}] row {index}", problem_key, answer_key, id_key,
                               default_id=f"{split}-{index}", default_source=path.name or source))
    return records


class PromptStream:
    """Batches of prompts in seeded per-epoch shuffles, resumable from :meth:`state_dict`.

    ``encode(problem) -> token ids`` is the caller's formatting and tokenization; it runs once per
    record.  Prompts longer than ``max_prompt_tokens`` are skipped (counted in
    ``num_skipped_too_long``).  A batch that crosses an epoch boundary continues into the next
    epoch's shuffle, so every batch is full.  Each data-parallel rank slices the whole batch itself.
    """

    def __init__(self, records: Sequence[PromptRecord], encode: Callable[[str], Iterable[int]], *,
                 max_prompt_tokens: int, seed: int = 0):
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
        if not records:
            raise DataError("PromptStream: no prompt records")
        self.seed = int(seed)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self._items: List[PromptItem] = []
        self.skipped_too_long_ids: List[str] = []
        for record in records:
            ids = tuple(int(t) for t in encode(record.problem))
            if len(ids) > self.max_prompt_tokens:
                self.skipped_too_long_ids.append(record.id)
            else:
                self._items.append(PromptItem(record, ids))
        if not self._items:
            raise DataError(
                f"PromptStream: all {len(records)} prompts are longer than max_prompt_tokens="
                f"{self.max_prompt_tokens} (e.g. {self.skipped_too_long_ids[:3]})"
            )
        # Identifies the kept prompts, so a state cannot be restored onto a different prompt set.
        self._fingerprint = hashlib.sha256("\0".join(i.record.id for i in self._items).encode()).hexdigest()[:16]
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    @property
    def num_skipped_too_long(self) -> int:
        return len(self.skipped_too_long_ids)

    def skipped_summary(self, first: int = 5) -> str:
        """One line for logs: how many prompts were too long, and the first few ids."""
        return (f"{self.num_skipped_too_long} prompts longer than {self.max_prompt_tokens} tokens skipped"
                + (f" (first: {', '.join(self.skipped_too_long_ids[:first])})" if self.skipped_too_long_ids else ""))

    def __len__(self) -> int:
        """Prompts per epoch (after skipping)."""
        return len(self._items)

    @property
    def epoch(self) -> int:
        """The epoch the next prompt comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Index of the next prompt within the current epoch's order."""
        return self._position

    def _permutation(self, epoch: int) -> List[int]:
        order = list(range(len(self._items)))
        random.Random(f"prompt-stream-{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self, batch_size: int) -> List[PromptItem]:
        """The next ``batch_size`` prompts, continuing into the next epoch when this one runs out."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        batch = []
        while len(batch) < batch_size:
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._permutation(self._epoch)
            batch.append(self._items[self._order[self._position]])
            self._position += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """Where the stream is, plus what must match on restore (plain data, checkpoint friendly)."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "num_prompts": len(self._items), "fingerprint": self._fingerprint}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state``; the records, encoder, limit and seed must be the saved stream's."""
        if (state["seed"], state["num_prompts"], state["fingerprint"]) != (
            self.seed, len(self._items), self._fingerprint
        ):
            raise DataError(
                f"PromptStream state is from a different stream (seed {state['seed']}, "
                f"{state['num_prompts']} prompts, ids {state['fingerprint']}; this one: seed {self.seed}, "
                f"{len(self._items)} prompts, ids {self._fingerprint})"
            )
        if not 0 <= state["position"] <= len(self._items) or state["epoch"] < 0:
            raise DataError(f"PromptStream state out of range: {state}")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._order = self._permutation(self._epoch)
