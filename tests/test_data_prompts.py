"""Prompt records from JSON Lines, the synthetic task and Hugging Face datasets; the resumable stream."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_eopd.data import DataError, PromptRecord, PromptStream, load_prompt_records

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MATH = Path(os.environ.get("EOPD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data" / "math"))


@pytest.fixture(scope="module")
def math500() -> Path:
    path = SHARED_MATH / "math500.jsonl"
    if not path.is_file():
        pytest.skip(f"offline benchmark data not found at {SHARED_MATH}")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_loads_the_shared_benchmark_as_written(math500):
    records = load_prompt_records(str(math500))
    first = json.loads(math500.open().readline())
    assert len(records) == 500
    assert records[0] == PromptRecord(first["id"], first["problem"], first["answer"], "math500")
    assert len({r.id for r in records}) == 500
    assert load_prompt_records(str(math500), limit=7) == records[:7]


_GOOD = {"id": "a", "problem": "1+1?", "answer": "2", "source": "t"}


@pytest.mark.parametrize(
    "lines, match",
    [
        ([_GOOD, "{not json"], r"bad\.jsonl:2: invalid JSON"),
        ([_GOOD, _GOOD, {"id": "c", "answer": "2"}], r"bad\.jsonl:3: missing field 'problem'"),
        ([{"id": "c", "problem": "  ", "answer": "2"}], r"bad\.jsonl:1: field 'problem' is empty"),
        ([{"id": "c", "problem": "x", "answer": ["2"]}], r"bad\.jsonl:1: field 'answer' must be a string, got list"),
        ([{"id": "c", "problem": 3, "answer": "2"}], r"bad\.jsonl:1: field 'problem' must be a string, got int"),
        (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
        (["", "  "], r"bad\.jsonl: no prompt records"),
    ],
)
def test_bad_jsonl_names_file_line_and_problem(tmp_path, lines, match):
    with pytest.raises(DataError, match=match):
        load_prompt_records(str(_write_jsonl(tmp_path / "bad.jsonl", lines)))


def test_missing_file_and_custom_keys(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_prompt_records(str(tmp_path / "nope.jsonl"))
    path = _write_jsonl(tmp_path / "custom.jsonl", [{"question": "q?", "final": 42}])
    (record,) = load_prompt_records(str(path), problem_key="question", answer_key="final")
    # Integer answers are common in public sets and become strings; missing id/source get defaults.
    assert record == PromptRecord("custom-1", "q?", "42", "custom")


def test_synthetic_source_and_its_splits():
    train = load_prompt_records("synthetic:arith", limit=50)
    test = load_prompt_records("synthetic:arith", split="test", limit=50)
    assert len(train) == len(test) == 50 and train[0].source == "synthetic:arith"
    assert not {r.problem for r in train} & {r.problem for r in test}
    with pytest.raises(DataError, match="split must be"):
        load_prompt_records("synthetic:arith", split="validation")
    with pytest.raises(DataError, match="unknown synthetic task"):
        load_prompt_records("synthetic:nope")


def test_hugging_face_dataset_saved_to_disk_and_from_data_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1), "unique_id": f"u{i}"} for i in range(5)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    records = load_prompt_records(str(saved), split="test", id_key="unique_id")
    assert [r.id for r in records] == [f"u{i}" for i in range(5)]
    assert records[3].problem == "What is 3+1?" and records[3].answer == "4" and records[3].source == "saved"
    with pytest.raises(DataError, match=r"no split 'train'"):
        load_prompt_records(str(saved), split="train")

    # A directory of data files goes through datasets.load_dataset, as a hub name would.
    data_dir = tmp_path / "hub_like"
    data_dir.mkdir()
    _write_jsonl(data_dir / "train.jsonl", rows)
    from_files = load_prompt_records(str(data_dir), id_key="unique_id", limit=2)
    assert [(r.id, r.problem, r.answer) for r in from_files] == [(r.id, r.problem, r.answer) for r in records[:2]]

    empty = tmp_path / "empty"  # datasets itself cannot reload an empty saved dataset: still a DataError
    datasets.Dataset.from_dict({"problem": [], "answer": []}).save_to_disk(str(empty))
    with pytest.raises(DataError, match=r"empty: (cannot load|no prompt records)"):
        load_prompt_records(str(empty))
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([{"problem": "x", "answer": ""}]).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"row 0: field 'answer' is empty"):
        load_prompt_records(str(bad))
    with pytest.raises(DataError, match="cannot load as a Hugging Face dataset"):
        load_prompt_records(str(tmp_path / "not_there"))


# ---------------------------------------------------------------- PromptStream

def _records(n):
    return [PromptRecord(f"r{i}", "x" * (1 + i % 9), str(i), "t") for i in range(n)]


def _encode(text):
    return [ord(c) for c in text]


def _ids(batch):
    return [item.record.id for item in batch]


def test_stream_epochs_are_seeded_permutations_and_batches_cross_epochs():
    records = _records(10)
    stream = PromptStream(records, _encode, max_prompt_tokens=100, seed=3)
    first = _ids(stream.next_batch(4)) + _ids(stream.next_batch(4))
    crossing = _ids(stream.next_batch(4))  # 2 from epoch 0, 2 from epoch 1
    assert stream.epoch == 1 and stream.position == 2
    epoch0 = first + crossing[:2]
    assert sorted(epoch0) == sorted(r.id for r in records) and epoch0 != [r.id for r in records]
    rest = crossing[2:] + _ids(stream.next_batch(8))
    assert sorted(rest) == sorted(r.id for r in records) and rest != epoch0  # a new shuffle per epoch
    again = PromptStream(records, _encode, max_prompt_tokens=100, seed=3)
    assert _ids(again.next_batch(10)) == epoch0
    other_seed = PromptStream(records, _encode, max_prompt_tokens=100, seed=4)
    assert _ids(other_seed.next_batch(10)) != epoch0


def test_stream_resume_gives_exactly_the_uninterrupted_batches():
    records = _records(13)
    reference = PromptStream(records, _encode, max_prompt_tokens=100, seed=0)
    expected = [_ids(reference.next_batch(5)) for _ in range(9)]  # several epoch boundaries

    for cut in (1, 2, 5):
        stream = PromptStream(records, _encode, max_prompt_tokens=100, seed=0)
        got = [_ids(stream.next_batch(5)) for _ in range(cut)]
        state = json.loads(json.dumps(stream.state_dict()))  # survives a checkpoint as plain data
        resumed = PromptStream(records, _encode, max_prompt_tokens=100, seed=0)
        resumed.load_state_dict(state)
        got += [_ids(resumed.next_batch(5)) for _ in range(9 - cut)]
        assert got == expected, cut

    with pytest.raises(DataError, match="different stream"):
        PromptStream(records, _encode, max_prompt_tokens=100, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="different stream"):
        PromptStream(records[:-1], _encode, max_prompt_tokens=100, seed=0).load_state_dict(state)
    renamed = [PromptRecord(r.id + "'", r.problem, r.answer, r.source) for r in records]
    with pytest.raises(DataError, match="different stream"):
        PromptStream(renamed, _encode, max_prompt_tokens=100, seed=0).load_state_dict(state)


def test_stream_skips_long_prompts_and_tokenizes_each_record_once():
    calls = []

    def encode(text):
        calls.append(text)
        return _encode(text)

    records = _records(20)  # problem lengths 1..9
    stream = PromptStream(records, encode, max_prompt_tokens=6, seed=0)
    too_long = [r.id for r in records if len(r.problem) > 6]
    assert stream.num_skipped_too_long == len(too_long) and stream.skipped_too_long_ids == too_long
    assert too_long[0] in stream.skipped_summary()
    assert len(stream) == 20 - len(too_long)
    seen = [item for _ in range(5) for item in stream.next_batch(7)]  # 35 items: more than two epochs
    assert all(len(item.prompt_ids) <= 6 and list(item.prompt_ids) == _encode(item.record.problem) for item in seen)
    assert len(calls) == 20

    with pytest.raises(ValueError, match="max_prompt_tokens must be positive"):
        PromptStream(records, encode, max_prompt_tokens=0)
    with pytest.raises(DataError, match=r"all 20 prompts are longer than max_prompt_tokens=1 \(e\.g\."):
        PromptStream([PromptRecord(r.id, "xx", "1", "t") for r in records], encode, max_prompt_tokens=1)
