import json
import random

import pytest

from cluster.core.config import DataSettings
from llm.data import (
    IGNORE_INDEX,
    DatasetError,
    Example,
    collate,
    dataset_sha256,
    encode_example,
    load_examples,
    load_split,
    split_examples,
)

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Route this support ticket: issue {i}"},
            {"role": "assistant", "content": f"ROUTE: T{i % 3}"},
        ],
        "team": f"T{i % 3}",
    }
    for i in range(40)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_only_the_answer_is_trained_on(demo_tokenizer):
    example = Example(
        [{"role": "user", "content": "Route this support ticket: my bill"}], "ROUTE: LEDGER"
    )
    encoded = encode_example(demo_tokenizer, example, max_length=96)
    answer_ids = [
        t
        for t, label in zip(encoded["input_ids"], encoded["labels"], strict=False)
        if label != IGNORE_INDEX
    ]
    prompt_labels = encoded["labels"][: len(encoded["labels"]) - len(answer_ids)]
    assert set(prompt_labels) == {IGNORE_INDEX}
    assert demo_tokenizer.decode(answer_ids).strip() == "ROUTE: LEDGER<|im_end|>"
    # labels are the input ids themselves at answer positions (the model shifts internally)
    assert answer_ids == encoded["input_ids"][-len(answer_ids) :]


def test_truncation_keeps_the_answer(demo_tokenizer):
    long_prompt = Example([{"role": "user", "content": "word " * 300}], "ROUTE: DOCK")
    encoded = encode_example(demo_tokenizer, long_prompt, max_length=32)
    assert len(encoded["input_ids"]) == 32
    answer = [
        t
        for t, label in zip(encoded["input_ids"], encoded["labels"], strict=False)
        if label != -100
    ]
    assert demo_tokenizer.decode(answer).startswith("ROUTE: DOCK")


def test_collate_masks_padding():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_split_is_deterministic_and_independent_of_row_order(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "a.jsonl", ROWS))
    shuffled_rows = ROWS[:]
    random.Random(7).shuffle(shuffled_rows)
    shuffled = load_examples(write_jsonl(tmp_path / "b.jsonl", shuffled_rows))

    first = split_examples(examples, 0.25, seed=0)
    again = split_examples(shuffled, 0.25, seed=0)
    other_seed = split_examples(examples, 0.25, seed=1)

    def answers(split):
        return sorted(e.prompt_messages[-1]["content"] for e in split.validation)

    assert len(first.validation) == 10 and len(first.train) == 30
    assert answers(first) == answers(again)
    assert answers(first) != answers(other_seed)
    train_prompts = {e.prompt_messages[-1]["content"] for e in first.train}
    assert train_prompts.isdisjoint(answers(first))


def test_jsonl_parquet_and_datasets_dir_give_the_same_examples(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "p1", "response": "r1", "team": "A"},
        {"prompt": "p2", "response": "r2", "team": "B"},
    ]
    jsonl = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    parquet = load_examples(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    from_disk = load_examples(tmp_path / "ds")
    assert jsonl == parquet == from_disk
    assert jsonl[0].meta == {"team": "A"}
    assert jsonl[0].prompt_messages == [{"role": "user", "content": "p1"}]


def test_bad_records_name_the_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"text": "no answer"}])
    with pytest.raises(DatasetError, match="record 1"):
        load_examples(path)
    ends_with_user = {
        "messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]
    }
    with pytest.raises(DatasetError, match="last message must be the assistant"):
        load_examples(write_jsonl(tmp_path / "bad2.jsonl", [ends_with_user]))
    (tmp_path / "bad3.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match="bad3.jsonl:1"):
        load_examples(tmp_path / "bad3.jsonl")


def test_dataset_hash_follows_content(tmp_path):
    a = dataset_sha256(write_jsonl(tmp_path / "a.jsonl", ROWS))
    assert a == dataset_sha256(write_jsonl(tmp_path / "same.jsonl", ROWS))
    assert a != dataset_sha256(write_jsonl(tmp_path / "b.jsonl", ROWS[:-1]))


def test_central_and_client_shares_split_the_training_part_and_share_the_heldout(tmp_path):
    path = str(write_jsonl(tmp_path / "a.jsonl", ROWS))

    def split(share: str):
        return load_split(
            DataSettings(path=path, validation_fraction=0.25, central_fraction=0.3, share=share)
        )

    whole, central, clients = split("all"), split("central"), split("clients")

    def prompts(examples):
        return [e.prompt_messages[-1]["content"] for e in examples]

    assert len(central.train) == 9 and len(clients.train) == 21
    assert prompts(central.train) + prompts(clients.train) == prompts(whole.train)
    assert prompts(central.validation) == prompts(clients.validation) == prompts(whole.validation)


def test_a_share_without_a_central_fraction_is_a_config_error():
    with pytest.raises(ValueError, match="needs data.central_fraction"):
        DataSettings(path="x.jsonl", share="central")
