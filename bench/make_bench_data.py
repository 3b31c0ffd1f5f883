"""Tokenizer and synthetic ARPO-shaped SFT data with realistic lengths, for the GPU benchmarks.

    python bench/make_bench_data.py tok  TOKDIR                  # byte-level BPE (8192 entries) + Qwen chat template
    python bench/make_bench_data.py data TOKDIR OUT.jsonl N [SEED] [--max-len L]

The tokenizer is sftjobs' own (sftjobs.io.demo_assets.make_tokenizer: <|endoftext|> pad, <|im_end|> eos, Qwen's
chat template) trained on a corpus of made-up words, so that many whole words are single tokens.

Rows are ARPO-SFT-54K's shape (sharegpt: system + human + gpt, the gpt turn with <think>, <search>/<python>,
<result> and <answer>\\boxed{}), filled with single-token words so the token count is known. Length
assumption (as ../shared/docs/gpu.md): tokens of system + human + gpt ~ LogNormal(median 3000, sigma 0.7),
clipped to [64, 14980] (the prod cutoff is 15000); the chat template then adds ~20 tokens. Deterministic.
Writes OUT.jsonl and OUT.jsonl.stats.json (median, mean, p90, max, total of the drawn lengths).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYL = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ga", "vu", "zen", "sha", "tor", "qua", "ble",
       "pra", "nix", "dor", "fel", "gri", "hun", "jas", "kel", "mur", "ost", "pil", "rud", "sam", "tiv"]
TAGS = ("<think>", "</think>", "<search>", "</search>", "<python>", "</python>", "<result>", "</result>",
        "<answer>", "</answer>", "\\boxed{", "}")


def corpus(n_lines: int = 40000, seed: int = 1):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYL, size=rng.integers(1, 5))) for _ in range(30000)]
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    zipf /= zipf.sum()
    for _ in range(n_lines):
        yield " ".join(rng.choice(words, size=40, p=zipf)) + ".\n"
    for _ in range(200):  # the ARPO tags, so they become few tokens each
        yield " ".join(TAGS) + "\n"


def make_tok(out: str) -> None:
    from sftjobs.io.demo_assets import make_tokenizer

    make_tokenizer(out, corpus(), vocab_size=8192)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    print(f"tokenizer saved in {out}: {len(tok)} entries, pad {tok.pad_token_id}, eos {tok.eos_token_id}")


def make_data(tokdir: str, out: str, n: int, seed: int = 0, max_len: int = 14980) -> dict:
    from transformers import AutoTokenizer

    from sftjobs.io.demo_assets import ARPO_SYSTEM

    tok = AutoTokenizer.from_pretrained(tokdir)
    vocab = tok.get_vocab()
    words = np.array(sorted(" " + t[1:] for t in vocab if t.startswith("\u0120") and len(t) > 2 and t[1:].isalpha()))
    n_tok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    sys_len = n_tok(ARPO_SYSTEM)
    rng = np.random.default_rng(seed)
    lens = np.clip(np.round(np.exp(np.log(3000) + 0.7 * rng.standard_normal(n))), 64, max_len).astype(int)
    mk = lambda k: "".join(rng.choice(words, size=max(1, int(k)))).strip()  # noqa: E731
    tag_cost = n_tok("<think></think><search></search><result></result><think></think><answer>\\boxed{x}</answer>")
    rows, errs = [], []
    for i, total in enumerate(lens):
        body = max(8, int(total) - sys_len - tag_cost)
        human = max(4, int(body * 0.1))         # a question, then a long tool-use trajectory
        rest = body - human
        think1, query, result, think2 = (max(1, int(rest * f)) for f in (0.25, 0.05, 0.5, 0.2))
        tool = "python" if rng.random() < 0.25 else "search"
        gpt = (f"<think>{mk(think1)}</think><{tool}>{mk(query)}</{tool}><result>{mk(result)}</result>"
               f"<think>{mk(think2)}</think><answer>\\boxed{{{mk(1)}}}</answer>")
        rows.append({"conversations": [{"from": "human", "value": mk(human)}, {"from": "gpt", "value": gpt}],
                     "system": ARPO_SYSTEM})
        if i < 20:
            errs.append(sys_len + n_tok(rows[-1]["conversations"][0]["value"]) + n_tok(gpt) - int(total))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    stats = {"n": n, "seed": seed, "median": float(np.median(lens)), "mean": float(lens.mean()),
             "p90": float(np.percentile(lens, 90)), "max": int(lens.max()), "total": int(lens.sum()),
             "token_count_error_first20": errs, "assumption": f"LogNormal(median 3000, sigma 0.7) clipped [64, {max_len}]"}
    Path(out + ".stats.json").write_text(json.dumps(stats, indent=1))
    print("data:", json.dumps(stats))
    return stats


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "tok":
        make_tok(sys.argv[2])
    elif what == "data":
        args = [a for a in sys.argv[2:] if not a.startswith("--")]
        max_len = 14980
        if "--max-len" in sys.argv:
            max_len = int(sys.argv[sys.argv.index("--max-len") + 1])
            args.remove(str(max_len))
        make_data(args[0], args[1], int(args[2]), int(args[3]) if len(args) > 3 else 0, max_len)
    else:
        sys.exit(__doc__)
