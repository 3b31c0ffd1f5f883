"""Synthetic records shaped like ARPO-SFT-54K (sharegpt) and Tool-Star-SFT-54K (alpaca).

Shared by the data-step tests and bench/bench_data_step.py. Deterministic for a given seed, and fast
enough to write ~800 MB in well under a minute: padding text is sliced from one pre-built pool instead
of being drawn word by word.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of the "
    "wikipedia search tool and python interpreter tool. Given a question, you need to first think about "
    "the reasoning process in the mind and then provide the answer. During thinking, you can invoke the "
    "wikipedia search tool to search and python interpreter tool to calculate the math problem for fact "
    "information about specific topics if needed. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags respectively."
)

_WORDS = (
    "the of and a to in is was for on as with by he at from his an were are which this be or "
    "population river capital founded album director election season team university village county "
    "museum railway temperature integral probability triangle velocity equation derivative prime "
    "answer check compute search result python print import sum range value therefore because "
    "naïve café Zürich 東京 données —"
).split()

_POOL_SIZE = 1 << 20


@functools.lru_cache(maxsize=8)
def _text_pool(seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < _POOL_SIZE:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


class ArpoSynth:
    """Makes ARPO-like records of roughly ``approx_bytes`` serialised size each."""

    def __init__(self, seed: int = 0, approx_bytes: int = 2000) -> None:
        self.rng = random.Random(seed)
        self.pool = _text_pool(seed)
        self.approx_bytes = approx_bytes

    def _text(self, n_chars: int) -> str:
        n_chars = max(8, n_chars)
        start = self.rng.randrange(0, len(self.pool) - n_chars - 1)
        return self.pool[start : start + n_chars]

    def sharegpt(self, i: int) -> dict[str, Any]:
        # The system prompt, question, tags and JSON framing take ~1.4 KB; the rest is think/result text.
        budget = max(200, self.approx_bytes - 1400)
        rounds = 1 + i % 3
        parts: list[str] = []
        for r in range(rounds):
            tool = "search" if (i + r) % 2 == 0 else "python"
            query = self._text(40) if tool == "search" else f"print(sum(range({i % 97 + 3})))"
            parts.append(f"<think>{self._text(budget // (2 * rounds))}</think>")
            parts.append(f"<{tool}>{query}</{tool}>")
            parts.append(f"<result>\n{self._text(budget // (2 * rounds))}\n</result>")
        parts.append(f"<think>{self._text(60)}</think>")
        parts.append(f"<answer>The answer is \\boxed{{{i % 1000}}}</answer>")
        return {
            "conversations": [
                {"from": "human", "value": f"Question {i}: {self._text(120)}?"},
                {"from": "gpt", "value": "".join(parts)},
            ],
            "system": SYSTEM_PROMPT,
        }

    def alpaca(self, i: int) -> dict[str, Any]:
        record = self.sharegpt(i)
        return {
            "instruction": record["conversations"][0]["value"],
            "input": "",
            "output": record["conversations"][1]["value"],
            "system": SYSTEM_PROMPT,
        }


def write_jsonl(path: Path, lines: Iterable[str | dict[str, Any]]) -> Path:
    """Write one line per item; a str item is written verbatim (how tests plant broken lines)."""
    with open(path, "w", encoding="utf-8") as handle:
        for item in lines:
            text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            handle.write(text + "\n")
    return path


def write_json_array(path: Path, records: Iterable[Any], indent: int | None = None) -> Path:
    """Write a JSON array without holding it in memory as one string."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[")
        for n, record in enumerate(records):
            if n:
                handle.write(",")
            handle.write("\n" if indent is not None else "")
            handle.write(json.dumps(record, ensure_ascii=False, indent=indent))
        handle.write("\n]\n" if indent is not None else "]")
    return path
