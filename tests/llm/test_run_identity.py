import pytest

from cluster.core.config import FinetuneConfig
from llm.run_identity import RunMismatchError, check_or_record

BASE = {"name": "r", "data": {"path": "d.jsonl"}, "train": {"max_steps": 10}}
DATA = "ab" * 32


def config(**sections) -> FinetuneConfig:
    return FinetuneConfig.model_validate({**BASE, **sections})


def test_resuming_with_more_steps_is_allowed(tmp_path):
    check_or_record(config(), tmp_path, data=DATA)
    check_or_record(config(train={"max_steps": 50}, eval={"max_examples": 5}), tmp_path, data=DATA)


def test_resuming_with_a_different_adapter_shape_is_refused(tmp_path):
    check_or_record(config(), tmp_path, data=DATA)
    with pytest.raises(RunMismatchError, match=r"lora\.r.*changed.*new `name`"):
        check_or_record(config(lora={"r": 16}), tmp_path, data=DATA)


def test_resuming_after_the_data_changed_is_refused_naming_it(tmp_path):
    """The steps already taken were accounted for the old examples (a grown file would re-price
    them at the new, lower sampling rates)."""
    check_or_record(config(), tmp_path, data=DATA)
    with pytest.raises(RunMismatchError, match=r"data has changed since \(sha256 abab"):
        check_or_record(config(), tmp_path, data="cd" * 32)
