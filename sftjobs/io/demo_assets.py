"""Everything the CPU demo needs, made on this machine: no hub, no GPU.

- a byte-level BPE tokenizer (Qwen-style special tokens and chat template),
- a random-init tiny Qwen2 model beside it,
- synthetic SFT rows in the ARPO shape (sharegpt) or the Tool-Star shape (alpaca).

The data is built from a few templated phrases over a small vocabulary, so a model of a few
hundred thousand parameters visibly lowers its loss within one epoch over ~200 rows. The numbers
mean nothing; the plumbing (files, formats, template, trainer) is what the demo exercises.

torch / tokenizers / transformers are imported inside the functions that need them, so the data
helpers work without the training stack.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sftjobs.errors import SftjobsError
from sftjobs.fsutil import atomic_write_text
from sftjobs.planning.model_shapes import DEMO_TOKENIZER_VOCAB, REAL_SHAPE_TOKENIZER_VOCAB, SYNTHETIC_SHAPES

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's chat template without the tool-calling branches: what LLaMA-Factory's `template: qwen`
# produces, so `tokenizer.apply_chat_template` and the trainer agree on the prompt format.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

ARPO_SYSTEM = (
    "You are a helpful assistant that can solve the given question step by step with the help of "
    "the wikipedia search tool and python interpreter tool. Think in <think></think>, search with "
    "<search></search> or run code with <python></python>; results come back in <result></result>. "
    "Give the final answer in <answer></answer> as \\boxed{}."
)

# A small closed world: the model only has to learn to copy the right words into the right slots.
_PLACES = [
    ("Aldor", "Venn"),
    ("Brisk", "Tolan"),
    ("Corvia", "Maru"),
    ("Dunmere", "Kesh"),
    ("Elbrin", "Sorra"),
    ("Fendal", "Quill"),
    ("Garrow", "Lumen"),
    ("Halvik", "Pera"),
    ("Istra", "Colm"),
    ("Jorund", "Vail"),
    ("Kestra", "Nolo"),
    ("Lorath", "Bree"),
]
_FACTS = ["capital", "largest river", "oldest city", "highest mountain"]


def _search_row(rng: random.Random) -> tuple[str, str]:
    place, name = rng.choice(_PLACES)
    fact = rng.choice(_FACTS)
    question = f"What is the {fact} of {place}?"
    answer = (
        f"<think>I need the {fact} of {place}. I will search for it.</think>"
        f"<search>{fact} of {place}</search>"
        f"<result>The {fact} of {place} is {name}.</result>"
        f"<think>The result says the {fact} of {place} is {name}.</think>"
        f"<answer>\\boxed{{{name}}}</answer>"
    )
    return question, answer


def _python_row(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    question = f"What is {a} plus {b}?"
    answer = (
        f"<think>I will add {a} and {b} with python.</think>"
        f"<python>print({a} + {b})</python>"
        f"<result>{a + b}</result>"
        f"<think>The sum of {a} and {b} is {a + b}.</think>"
        f"<answer>\\boxed{{{a + b}}}</answer>"
    )
    return question, answer


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (question, tool-use answer) pairs; three in four use search, one in four python."""
    rng = random.Random(seed)
    return [(_python_row if rng.random() < 0.25 else _search_row)(rng) for _ in range(n)]


def make_synthetic_arpo(path: str | os.PathLike, n: int, seed: int = 0, shape: str = "sharegpt") -> Path:
    """Write ``n`` synthetic rows as JSONL, atomically.

    shape="sharegpt" is ARPO-SFT-54K's shape: {"conversations": [{"from": "human", ...},
    {"from": "gpt", ...}], "system": ...}; shape="alpaca" is Tool-Star's: instruction / input / output.
    """
    if shape not in ("sharegpt", "alpaca"):
        raise SftjobsError(f"make_synthetic_arpo: shape must be 'sharegpt' or 'alpaca', not {shape!r}")
    if n < 1:
        raise SftjobsError(f"make_synthetic_arpo: n must be at least 1, not {n}")
    rows: list[dict[str, Any]] = []
    for question, answer in synthetic_pairs(n, seed):
        if shape == "sharegpt":
            rows.append(
                {
                    "conversations": [
                        {"from": "human", "value": question},
                        {"from": "gpt", "value": answer},
                    ],
                    "system": ARPO_SYSTEM,
                }
            )
        else:
            rows.append({"instruction": ARPO_SYSTEM + "\n\n" + question, "input": "", "output": answer})
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return atomic_write_text(path, text)


def texts_from_jsonl(path: str | os.PathLike) -> list[str]:
    """Every string field of a sharegpt or alpaca JSONL file (a tokenizer corpus)."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SftjobsError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or regenerate the file") from exc
            for key in ("system", "instruction", "input", "output"):
                if isinstance(row.get(key), str):
                    texts.append(row[key])
            for turn in row.get("conversations") or []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    texts.append(turn["value"])
    return texts


def make_tokenizer(out_dir: str | os.PathLike, corpus_texts: Iterable[str], vocab_size: int = 1500) -> Path:
    """Train a byte-level BPE on ``corpus_texts`` and save it as a transformers tokenizer.

    eos is <|im_end|> and pad <|endoftext|>, as in Qwen2.5-Instruct; the chat template is Qwen's.
    Byte-level means any text encodes, even words the corpus never had.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    # The template's own words belong in the corpus, so "system"/"assistant" become single tokens.
    texts = list(corpus_texts) + ["system\nuser\nassistant\nYou are a helpful assistant.\n"] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = QWEN_CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    # Older/newer transformers differ in where the template is saved (tokenizer_config.json vs
    # chat_template.jinja); keep it in tokenizer_config.json as well so both kinds of reader see it.
    # transformers 5 writes its internal class name (TokenizersBackend); PreTrainedTokenizerFast is
    # the name every transformers version resolves.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = QWEN_CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return out_dir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# Random-init model shapes. "tiny" is the CPU demo's model (vocab = the tokenizer's); the others have the real
# dimensions of Qwen2.5-*-Instruct (random weights: speed and memory are meaningful, loss values are not), so a
# GPU run measures what the real model would cost without the hub. Source: the models' config.json on the hub.
def synthetic_shape(name: str) -> dict[str, Any]:
    if name not in SYNTHETIC_SHAPES:
        raise SftjobsError(f"unknown synthetic model shape {name!r}; choose one of {', '.join(SYNTHETIC_SHAPES)}")
    return SYNTHETIC_SHAPES[name]


def qwen2_config(shape: str, tokenizer) -> Any:
    """The Qwen2Config of a synthetic shape; vocab = the shape's (>= the tokenizer's) or the tokenizer's size."""
    return qwen2_config_from_dims(synthetic_shape(shape), tokenizer, shape)


def qwen2_config_from_dims(dims: dict[str, Any], tokenizer, name: str = "custom") -> Any:
    from transformers import Qwen2Config

    vocab = dims["vocab"] or len(tokenizer)
    if vocab < len(tokenizer):
        raise SftjobsError(f"the tokenizer has {len(tokenizer)} entries, more than the {name} shape's vocab {vocab}")
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=dims["max_positions"],
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        hidden_act="silu",
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def shape_mismatch(model_dir: str | os.PathLike, shape: str) -> str | None:
    """None when model_dir/config.json has the shape's dimensions, else what differs (for real shapes only)."""
    dims = synthetic_shape(shape)
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable config.json"
    want = {"hidden_size": dims["hidden"], "intermediate_size": dims["intermediate"],
            "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
            "num_key_value_heads": dims["kv_heads"]}
    if dims["vocab"]:
        want["vocab_size"] = dims["vocab"]
    diff = [f"{k} {cfg.get(k)} (want {v})" for k, v in want.items() if cfg.get(k) != v]
    return ", ".join(diff) or None


def make_random_qwen2(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    shape: str = "tiny",
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """A random-init Qwen2ForCausalLM of ``shape`` (tied embeddings, safetensors) with its tokenizer beside it.

    tiny is saved in fp32 and built on the CPU (same arguments and seed, same bytes); the real shapes are saved
    in bf16, like the hub's checkpoints, and built on the GPU when one is visible (a 3B init takes ~1 s there,
    ~1 min on a CPU; the random numbers then differ between the two, which does not matter for random weights).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    dims = synthetic_shape(shape)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = qwen2_config(shape, tokenizer)
    dtype = getattr(torch, dims["dtype"])
    if device is None:
        device = "cuda" if shape != "tiny" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return _save_beside_tokenizer(model, out_dir, tokenizer_dir)


def make_tiny_qwen2(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
) -> Path:
    """A random-init Qwen2ForCausalLM (tied embeddings, fp32 safetensors) with its tokenizer beside it.

    The same arguments and seed give the same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dims = {**SYNTHETIC_SHAPES["tiny"], "hidden": hidden, "intermediate": intermediate, "layers": layers,
            "heads": heads, "kv_heads": kv_heads}
    cfg = qwen2_config_from_dims(dims, tokenizer, "tiny")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return _save_beside_tokenizer(model, out_dir, tokenizer_dir)


def _save_beside_tokenizer(model, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Save ``model`` (safetensors) in ``out_dir`` and copy the tokenizer's files from ``tokenizer_dir`` beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer_dir.resolve() != out_dir.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


def make_demo_model(
    local_dir: str | os.PathLike,
    data_texts_or_path: Iterable[str] | str | os.PathLike,
    seed: int = 0,
    log=print,
    shape: str = "tiny",
) -> Path:
    """Tokenizer + random model of ``shape`` in ``local_dir``; does nothing when ``local_dir`` already passes the check.

    ``data_texts_or_path`` is the tokenizer corpus: a JSONL file (sharegpt or alpaca) or strings. A tokenizer
    already in ``local_dir`` without a loadable model (tokenizer.json and tokenizer_config.json) is used as it
    is, so a benchmark can bring its own tokenizer and have the weights made around it. A complete model of
    another real shape is an error, never overwritten. Built in a temp folder beside ``local_dir`` and moved in
    file by file, so an interrupted run leaves either the old files or the new ones.
    """
    from sftjobs.io.model_files import check_model_dir

    dims = synthetic_shape(shape)
    local_dir = Path(local_dir)
    try:
        summary = check_model_dir(local_dir)
    except SftjobsError:
        pass
    else:
        mismatch = shape_mismatch(local_dir, shape) if dims["vocab"] else None
        if mismatch:
            raise SftjobsError(
                f"{local_dir} already holds a model that is not of the {shape} shape ({mismatch}); point "
                f"model.local_dir at another folder, or delete this one to have it made again"
            )
        log(f"{shape} model already in {local_dir} ({summary['model_type']}, {summary['n_params']} params); kept")
        return local_dir

    own_tokenizer = all((local_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    texts: list[str] = []
    if not own_tokenizer:
        if isinstance(data_texts_or_path, (str, os.PathLike)):
            texts = texts_from_jsonl(data_texts_or_path)
        else:
            texts = list(data_texts_or_path)
        if not texts:
            raise SftjobsError(f"make_demo_model: the tokenizer corpus for {local_dir} is empty; give it the demo data")

    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", dir=local_dir.parent))
    try:
        if own_tokenizer:
            for name in TOKENIZER_FILES:
                if (local_dir / name).is_file():
                    shutil.copyfile(local_dir / name, tmp / name)
            log(f"using the tokenizer already in {local_dir}")
        else:
            make_tokenizer(tmp, texts, vocab_size=REAL_SHAPE_TOKENIZER_VOCAB if dims["vocab"] else DEMO_TOKENIZER_VOCAB)
        if shape == "tiny":
            make_tiny_qwen2(tmp, tmp, seed=seed)
        else:
            make_random_qwen2(tmp, tmp, shape=shape, seed=seed)
        local_dir.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir()):
            os.chmod(item, 0o644)  # some writers create 0600 files; jobs may run as another user
            os.replace(item, local_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = check_model_dir(local_dir)
    log(f"{shape} model made in {local_dir} ({summary['n_params']} params, {summary['total_bytes']} bytes)")
    return local_dir
