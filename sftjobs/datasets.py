"""The data sets a run registers with LLaMA-Factory: their names, files and dataset_info.json.

The one place that names them: the profile's data.dataset choices, the data step's outputs, render's and the
data step's dataset_info.json, and validate's sample prompts all read it here.
"""

from __future__ import annotations

import json
import os

from sftjobs.templating import render_template

FULL = "arpo_sft_54k"   # the whole (validated) data set
TOY = "arpo_sft_toy"    # its first data.toy_samples rows
DATASET_FILES = {FULL: f"{FULL}.jsonl", TOY: f"{TOY}.jsonl"}
DATASET_NAMES = tuple(DATASET_FILES)
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}


def dataset_info(shape: str, data_dir: str) -> str:
    """dataset_info.json for LLaMA-Factory; shape "auto" registers sharegpt until the data step detects otherwise."""
    shape = "alpaca" if shape == "alpaca" else "sharegpt"
    entries = [{"name": name, "file_name": os.path.join(data_dir, file)} for name, file in DATASET_FILES.items()]
    columns = ALPACA_COLUMNS if shape == "alpaca" else SHAREGPT_COLUMNS
    text = render_template("dataset_info.json.j2", entries=entries, shape=shape, columns=columns)
    json.loads(text)  # a template bug must not reach LLaMA-Factory
    return text
