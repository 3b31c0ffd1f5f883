"""sftjobs/llamafactory_keys.txt (what profile validation checks train: keys against, without importing
llamafactory on a login node) must be exactly the keys of the installed LLaMA-Factory's train parser on the pinned
transformers (setup.cfg's train extra). On another transformers (tests/version_matrix.sh) LLaMA-Factory's own keys must
all be there and the keys that differ must be transformers' TrainingArguments fields: the snapshot is the pin's."""

import configparser
import dataclasses
import re
from pathlib import Path

import pytest

from sftjobs.profile import llamafactory_keys

pytestmark = pytest.mark.train


def pinned(package: str) -> str:
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    found = re.search(rf"^\s*{package}==(\S+)", cfg["options.extras_require"]["train"], re.M)
    assert found, f"{package} is not pinned in setup.cfg's train extra"
    return found.group(1)


def test_key_snapshot_matches_installed_llamafactory():
    import llamafactory
    import transformers
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from llamafactory.hparams.training_args import TrainingArguments

    assert llamafactory.__version__ == "0.9.5"

    def keys(*classes):
        return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}

    live = keys(ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments)
    snapshot = set(llamafactory_keys())
    if transformers.__version__ == pinned("transformers"):
        assert snapshot == live, {"missing": sorted(live - snapshot)[:20], "stale": sorted(snapshot - live)[:20]}
        return
    hf = keys(transformers.Seq2SeqTrainingArguments)
    own = live - hf  # LLaMA-Factory's own keys, whatever transformers is installed
    assert own <= snapshot, sorted(own - snapshot)
    assert live - snapshot <= hf, sorted(live - snapshot - hf)  # only transformers' fields differ
