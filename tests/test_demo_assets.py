"""The CPU demo's local assets: synthetic ARPO-shaped data, a byte-level BPE tokenizer, a tiny Qwen2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sftjobs.errors import SftjobsError
from sftjobs.io import demo_assets
from sftjobs.io.model_files import check_model_dir

TAGS = re.compile(
    r"^<think>.+</think>(<search>.+</search>|<python>.+</python>)<result>.+</result>"
    r"<think>.+</think><answer>\\boxed\{.+\}</answer>$"
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- data (no torch) ---------------------------------------------------------------------------


def test_sharegpt_rows_have_the_arpo_shape(tmp_path):
    path = demo_assets.make_synthetic_arpo(tmp_path / "d" / "toy.jsonl", 50)
    rows = _rows(path)
    assert len(rows) == 50
    for row in rows:
        assert set(row) == {"conversations", "system"} and row["system"]
        human, gpt = row["conversations"]
        assert set(human) == set(gpt) == {"from", "value"}
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert TAGS.match(gpt["value"]), gpt["value"]
    tools = {("<search>" in r["conversations"][1]["value"]) for r in rows}
    assert tools == {True, False}  # both search and python rows
    assert [p.name for p in path.parent.iterdir()] == ["toy.jsonl"]  # no temp file left behind


def test_alpaca_rows(tmp_path):
    rows = _rows(demo_assets.make_synthetic_arpo(tmp_path / "a.jsonl", 10, shape="alpaca"))
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"].startswith(demo_assets.ARPO_SYSTEM) and row["input"] == ""
        assert TAGS.match(row["output"])


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path):
    a = demo_assets.make_synthetic_arpo(tmp_path / "a.jsonl", 30, seed=4).read_bytes()
    b = demo_assets.make_synthetic_arpo(tmp_path / "b.jsonl", 30, seed=4).read_bytes()
    c = demo_assets.make_synthetic_arpo(tmp_path / "c.jsonl", 30, seed=5).read_bytes()
    assert a == b != c


def test_answers_are_right(tmp_path):
    """A model is taught to copy facts from <result> into \\boxed{}: the data must agree with itself."""
    for question, answer in demo_assets.synthetic_pairs(200, seed=2):
        result = re.search(r"<result>(.+)</result>", answer).group(1)
        boxed = re.search(r"\\boxed\{(.+)\}", answer).group(1)
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", question):
            assert int(boxed) == int(m[1]) + int(m[2]) == int(result)
        else:
            assert result.endswith(f" is {boxed}.")


def test_small_vocabulary(tmp_path):
    words = set()
    for question, answer in demo_assets.synthetic_pairs(500):
        words.update(re.findall(r"[A-Za-z]+", question + answer))
    assert len(words) < 100


def test_bad_arguments(tmp_path):
    with pytest.raises(SftjobsError, match="shape"):
        demo_assets.make_synthetic_arpo(tmp_path / "x.jsonl", 5, shape="openai")
    with pytest.raises(SftjobsError, match="n must"):
        demo_assets.make_synthetic_arpo(tmp_path / "x.jsonl", 0)


def test_texts_from_jsonl(tmp_path):
    path = demo_assets.make_synthetic_arpo(tmp_path / "t.jsonl", 3)
    texts = demo_assets.texts_from_jsonl(path)
    assert len(texts) == 9 and texts[0] == demo_assets.ARPO_SYSTEM
    (tmp_path / "bad.jsonl").write_text('{"system": "x"}\n{oops\n')
    with pytest.raises(SftjobsError, match=r"bad\.jsonl:2"):
        demo_assets.texts_from_jsonl(tmp_path / "bad.jsonl")


# --- tokenizer and model (torch, transformers) -------------------------------------------------


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("demo")
    data = demo_assets.make_synthetic_arpo(root / "data" / "toy.jsonl", 200)
    return demo_assets.make_demo_model(root / "model", data, log=lambda _: None), data


@pytest.mark.train
def test_model_dir_passes_the_check_and_is_tiny(demo_model):
    model_dir, _ = demo_model
    summary = check_model_dir(model_dir)
    assert summary["model_type"] == "qwen2" and summary["tokenizer"] == "tokenizer.json"
    assert summary["n_weight_files"] == 1 and summary["total_bytes"] < 5 * 2**20
    assert 10_000 < summary["n_params"] < 1_000_000
    assert all(oct(p.stat().st_mode)[-3:] == "644" for p in model_dir.iterdir())
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".model.")]  # temp dir removed


@pytest.mark.train
def test_loads_with_transformers_and_the_chat_template_renders(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = demo_model
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings and model.get_input_embeddings().num_embeddings == len(tok)
    assert 500 <= len(tok) <= 2000
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) < len(tok)
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "<answer>\\boxed{5}</answer>"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n<answer>\\boxed{5}</answer><|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    # byte-level: text the corpus never had still round-trips
    odd = "naïve Zürich 東京 ∑"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


@pytest.mark.train
def test_same_seed_same_weights(demo_model, tmp_path):
    model_dir, _ = demo_model
    demo_assets.make_tiny_qwen2(tmp_path / "again", model_dir, seed=0)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    demo_assets.make_tiny_qwen2(tmp_path / "other", model_dir, seed=1)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


@pytest.mark.train
def test_make_demo_model_is_idempotent_and_repairs(demo_model):
    model_dir, data = demo_model
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    logs: list[str] = []
    demo_assets.make_demo_model(model_dir, data, log=logs.append)
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before and "kept" in logs[0]
    (model_dir / "tokenizer.json").unlink()  # broken => made again
    demo_assets.make_demo_model(model_dir, data, log=logs.append)
    check_model_dir(model_dir)


@pytest.mark.train
def test_the_data_is_learnable(demo_model):
    """A few dozen optimizer steps on the chat-formatted rows visibly lower the loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = demo_model
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = []
    for row in _rows(data)[:64]:
        messages = [{"role": "system", "content": row["system"]}] + [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in row["conversations"]
        ]
        texts.append(tok.apply_chat_template(messages, tokenize=False))
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] < 256  # fits the demo's cutoff_len
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        sl = slice((step % 4) * 16, (step % 4) * 16 + 16)
        loss = model(
            input_ids=batch["input_ids"][sl], attention_mask=batch["attention_mask"][sl], labels=labels[sl]
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses


@pytest.mark.train
def test_llamafactory_trains_on_it(demo_model, tmp_path):
    """The demo profile's path: llamafactory-cli train on CPU with template qwen (about 15-25 s)."""
    cli = shutil.which("llamafactory-cli") or str(Path(sys.executable).parent / "llamafactory-cli")
    if not os.path.exists(cli):
        pytest.skip("llamafactory-cli is not installed")
    model_dir, data = demo_model
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {
                "arpo_sft_toy": {
                    "file_name": str(data),
                    "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "system": "system"},
                }
            }
        )
    )
    out = tmp_path / "out"
    (tmp_path / "train.yaml").write_text(
        textwrap.dedent(f"""\
        model_name_or_path: {model_dir}
        stage: sft
        do_train: true
        finetuning_type: full
        dataset_dir: {tmp_path}
        dataset: arpo_sft_toy
        template: qwen
        cutoff_len: 256
        max_samples: 200
        overwrite_cache: true
        preprocessing_num_workers: 1
        output_dir: {out}
        logging_steps: 1
        save_steps: 1000
        overwrite_output_dir: true
        per_device_train_batch_size: 4
        learning_rate: 5.0e-3
        max_steps: 20
        lr_scheduler_type: cosine
        warmup_ratio: 0.1
        bf16: false
        use_cpu: true
        report_to: none
        """)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [cli, "train", str(tmp_path / "train.yaml")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    assert (out / "model.safetensors").is_file()
