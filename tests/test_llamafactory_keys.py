"""sftjobs/llamafactory_keys.txt (what profile validation checks train: keys against, without importing
llamafactory on a login node) must be exactly the keys of the installed LLaMA-Factory's train parser."""

import dataclasses

import pytest

from sftjobs.profile import llamafactory_keys

pytestmark = pytest.mark.train


def test_key_snapshot_matches_installed_llamafactory():
    import llamafactory
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from llamafactory.hparams.training_args import TrainingArguments

    assert llamafactory.__version__ == "0.9.5"
    live = set()
    for cls in (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments):
        live |= {f.name for f in dataclasses.fields(cls) if f.init}
    snapshot = set(llamafactory_keys())
    assert snapshot == live, {"missing": sorted(live - snapshot)[:20], "stale": sorted(snapshot - live)[:20]}
