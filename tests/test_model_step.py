"""The model step: fetch_model through a local stand-in for the hub, and check_model_dir's verdicts.

Downloads run in a fresh interpreter: huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN
into module constants when it is imported, exactly as on a compute node, so patching its constants
in-process would test something other than what runs for real.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import HubRepo, HubServer, hub_env, hub_server, run_download

from sftjobs.errors import SftjobsError
from sftjobs.io.model_files import check_model_dir, fetch_model

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "Qwen/Tiny-Test-Instruct"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

_RUNNER = """
import json, os, sys, time
if os.environ.get("TEST_NO_BACKOFF"):
    time.sleep = lambda seconds: None  # huggingface_hub backs off ~25 s against a dead hub
from pathlib import Path
from sftjobs.errors import SftjobsError
from sftjobs.io.model_files import fetch_model, check_model_dir
hub_id, local_dir, revision = sys.argv[1:4]
try:
    path = fetch_model(hub_id=hub_id, local_dir=Path(local_dir), path=None, revision=revision or None,
                       log=lambda msg: print(msg, file=sys.stderr))
except SftjobsError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(2)
print(json.dumps({"path": str(path), "summary": check_model_dir(path)}))
"""


# --- a fake (torch-free) model folder ----------------------------------------------------------


def safetensors_bytes(tensors: dict[str, list[int]]) -> bytes:
    """A valid safetensors file of zero-filled F32 tensors (8-byte length, JSON header, data)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        n = 4
        for dim in shape:
            n *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def fake_model(folder: Path, *, sharded: bool = True, with_bin: bool = True) -> Path:
    """config + tokenizer + safetensors (2 shards and an index) + files training does not need."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    (folder / "generation_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (folder / "README.md").write_text("# a model card\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    if sharded:
        (folder / SHARDS[0]).write_bytes(safetensors_bytes({"embed": [64, 16], "norm": [16]}))
        (folder / SHARDS[1]).write_bytes(safetensors_bytes({"layer.0.w": [16, 16]}))
        index = {"metadata": {}, "weight_map": {"embed": SHARDS[0], "norm": SHARDS[0], "layer.0.w": SHARDS[1]}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (folder / "model.safetensors").write_bytes(safetensors_bytes({"embed": [64, 16]}))
    if with_bin:
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickled weights that must not be fetched")
    return folder


N_PARAMS = 64 * 16 + 16 + 16 * 16


@pytest.fixture
def model_src(tmp_path):
    return fake_model(tmp_path / "src")


@pytest.fixture
def hub(model_src):
    with hub_server({("model", REPO): model_src}) as server:
        yield server


def fetch(
    tmp_path: Path,
    endpoint: str,
    *,
    repo: str = REPO,
    revision: str = "",
    offline: bool = False,
    token: str | None = None,
    no_backoff: bool = False,
    local_dir: Path | None = None,
    hf_home: Path | None = None,
) -> tuple[int, dict]:
    env = hub_env(endpoint, hf_home or tmp_path / "hf_home", offline=offline, token=token, no_backoff=no_backoff)
    local_dir = local_dir or tmp_path / "models" / "tiny"
    return run_download(_RUNNER, [repo, str(local_dir), revision], env)


# --- downloads ---------------------------------------------------------------------------------


def test_downloads_what_training_needs_and_nothing_else(tmp_path, hub, model_src):
    rc, out = fetch(tmp_path, hub.url)
    assert rc == 0, out
    local = tmp_path / "models" / "tiny"
    assert Path(out["path"]) == local
    got = {p.name for p in local.iterdir() if p.is_file()}
    assert got == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        *SHARDS,
    }
    for name in SHARDS:
        assert (local / name).read_bytes() == (model_src / name).read_bytes()
    assert out["summary"]["n_params"] == N_PARAMS and out["summary"]["n_weight_files"] == 2
    fetched = {r.file for r in hub.downloads()}
    assert "pytorch_model.bin" not in fetched and "README.md" not in fetched  # safetensors exist: no pickles
    assert all(r.authorization is None for r in hub.requests)  # no HF_TOKEN => no credentials sent
    assert not [r for r in hub.requests if "xet" in r.path.lower() or "xet" in json.dumps(r.query).lower()]


def test_rerun_fetches_nothing_and_a_lost_shard_only_that(tmp_path, hub):
    assert fetch(tmp_path, hub.url)[0] == 0
    hub.requests.clear()
    assert fetch(tmp_path, hub.url)[0] == 0
    assert hub.downloads() == []  # everything on disk already
    (tmp_path / "models" / "tiny" / SHARDS[1]).unlink()
    hub.requests.clear()
    rc, out = fetch(tmp_path, hub.url)
    assert rc == 0, out
    assert [r.file for r in hub.downloads()] == [SHARDS[1]]


def test_a_dropped_connection_resumes_with_a_range_request(tmp_path, model_src):
    """huggingface_hub resumes a file within one run, from the last whole 10 MiB chunk it received.

    (Across runs it does not: a half-written file is deleted, and the next run fetches that file
    again while keeping the finished ones; see test_rerun_fetches_nothing_and_a_lost_shard_only_that.)
    """
    big = model_src / SHARDS[0]
    big.write_bytes(safetensors_bytes({"embed": [6144, 1024]}))  # 24 MiB: more than one chunk in half
    index = {"metadata": {}, "weight_map": {"embed": SHARDS[0], "layer.0.w": SHARDS[1]}}
    (model_src / "model.safetensors.index.json").write_text(json.dumps(index))
    with hub_server({("model", REPO): model_src}, truncate_once={SHARDS[0]}) as hub:
        rc, out = fetch(tmp_path, hub.url)
    assert rc == 0, out
    assert (tmp_path / "models" / "tiny" / SHARDS[0]).read_bytes() == big.read_bytes()
    gets = hub.downloads(SHARDS[0])
    assert len(gets) == 2 and gets[0].truncated and gets[0].range is None
    start = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= big.stat().st_size // 2  # only what was missing was asked for again


def test_repo_without_safetensors_falls_back_to_bin(tmp_path):
    src = tmp_path / "binrepo"
    fake_model(src, sharded=False, with_bin=True)
    (src / "model.safetensors").unlink()
    with hub_server({("model", REPO): src}) as hub:
        rc, out = fetch(tmp_path, hub.url)
    assert rc == 0, out
    assert out["summary"]["weight_format"] == "bin" and out["summary"]["n_params"] == 0
    assert [r.file for r in hub.downloads() if r.file.endswith(".bin")] == ["pytorch_model.bin"]


def test_offline_with_nothing_downloaded_is_a_clear_error(tmp_path, hub):
    rc, out = fetch(tmp_path, hub.url, offline=True)
    assert rc == 2
    assert "HF_HUB_OFFLINE" in out["error"] and REPO in out["error"] and "model.path" in out["error"]
    assert hub.requests == []  # offline means offline


def test_offline_uses_an_earlier_download(tmp_path, hub):
    assert fetch(tmp_path, hub.url)[0] == 0
    hub.requests.clear()
    rc, out = fetch(tmp_path, hub.url, offline=True)
    assert rc == 0, out
    assert out["summary"]["n_params"] == N_PARAMS
    assert hub.requests == []


def test_offline_with_a_partial_download_names_what_is_missing(tmp_path, hub):
    assert fetch(tmp_path, hub.url)[0] == 0
    (tmp_path / "models" / "tiny" / SHARDS[1]).unlink()
    rc, out = fetch(tmp_path, hub.url, offline=True)
    assert rc == 2
    assert SHARDS[1] in out["error"] and "HF_HUB_OFFLINE" in out["error"]


def test_offline_with_a_partial_download_and_no_cache_says_why(tmp_path, hub):
    """Without the main cache's refs, snapshot_download hands back local_dir as is; the check judges it."""
    assert fetch(tmp_path, hub.url)[0] == 0
    (tmp_path / "models" / "tiny" / SHARDS[1]).unlink()
    rc, out = fetch(tmp_path, hub.url, offline=True, hf_home=tmp_path / "other_home")
    assert rc == 2
    assert SHARDS[1] in out["error"] and "Nothing new was downloaded (HF_HUB_OFFLINE is set)" in out["error"]


def test_gated_repo_needs_the_token_from_the_environment_and_it_is_not_written(tmp_path, model_src):
    secret = "hf_test_secret_token_456"
    with hub_server({("model", REPO): model_src}, token=secret, gated={("model", REPO)}) as hub:
        rc, out = fetch(tmp_path, hub.url)
        assert rc == 2
        assert "gated" in out["error"] and "HF_TOKEN" in out["error"] and REPO in out["error"]
        hub.requests.clear()
        rc, out = fetch(tmp_path, hub.url, token=secret)
        assert rc == 0, out
        assert {r.authorization for r in hub.downloads()} == {f"Bearer {secret}"}
    for path in tmp_path.rglob("*"):  # local_dir, its .cache/huggingface metadata, HF_HOME
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_unknown_repo_and_revision(tmp_path, hub):
    rc, out = fetch(tmp_path, hub.url, repo="nobody/nothing")
    assert rc == 2 and "nobody/nothing" in out["error"] and "model.hub_id" in out["error"]
    rc, out = fetch(tmp_path, hub.url, revision="v9", local_dir=tmp_path / "other")
    assert rc == 2 and "'v9'" in out["error"] and "model.revision" in out["error"]


def test_unreachable_hub_is_a_clear_error(tmp_path):
    with HubServer() as hub:
        dead = hub.url  # a port that was just free and is closed again
    rc, out = fetch(tmp_path, dead, no_backoff=True)
    assert rc == 2
    assert "reach" in out["error"] and "HF_ENDPOINT" in out["error"]


def test_dataset_repos_are_served_too(tmp_path):
    """The stand-in serves dataset repos for the data step (hf_hub_download, repo_type=dataset)."""
    repo = HubRepo("org/some-data", {"rows.jsonl": b'{"a": 1}\n'}, repo_type="dataset")
    code = (
        "import sys; from huggingface_hub import hf_hub_download; "
        "print(hf_hub_download('org/some-data', 'rows.jsonl', repo_type='dataset', local_dir=sys.argv[1]))"
    )
    with HubServer([repo]) as hub:
        env = hub_env(hub.url, tmp_path / "hf_home")
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True, env=env, timeout=60
        )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]).read_bytes() == b'{"a": 1}\n'
    assert [r.method for r in hub.requests_for("/datasets/org/some-data/resolve/main/rows.jsonl")] == ["HEAD", "GET"]


# --- a local path, and check_model_dir ---------------------------------------------------------


def test_local_path_is_used_as_is(tmp_path, model_src, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be asked of any hub
    before = sorted(p.name for p in model_src.iterdir())
    logs: list[str] = []
    assert fetch_model(hub_id="ignored/when-path-is-set", local_dir=None, path=model_src, log=logs.append) == model_src
    assert sorted(p.name for p in model_src.iterdir()) == before
    assert "local" in logs[0] and str(model_src) in logs[0]


def test_local_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(SftjobsError, match="model.path"):
        fetch_model(hub_id=None, local_dir=None, path=tmp_path / "nope", log=lambda _: None)


def test_neither_hub_id_nor_path(tmp_path):
    with pytest.raises(SftjobsError, match="model.hub_id"):
        fetch_model(hub_id=None, local_dir=tmp_path, path=None, log=lambda _: None)


def test_check_summary(model_src):
    summary = check_model_dir(model_src)
    assert summary["model_type"] == "qwen2" and summary["tokenizer"] == "tokenizer.json"
    assert summary["weight_format"] == "safetensors" and summary["n_weight_files"] == 2
    assert summary["n_params"] == N_PARAMS
    assert summary["total_bytes"] == sum((model_src / s).stat().st_size for s in SHARDS)


def _fails(folder: Path, *needles: str) -> str:
    with pytest.raises(SftjobsError) as info:
        check_model_dir(folder)
    message = str(info.value)
    assert str(folder) in message or folder.name in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_weights(model_src):
    for name in [*SHARDS, "model.safetensors.index.json", "pytorch_model.bin"]:
        (model_src / name).unlink()
    _fails(model_src, "no weights", "re-run the model step")


def test_missing_tokenizer(model_src):
    (model_src / "tokenizer.json").unlink()
    _fails(model_src, "no tokenizer", "tokenizer.json")


def test_other_tokenizer_layouts_pass(model_src):
    (model_src / "tokenizer.json").unlink()
    (model_src / "tokenizer.model").write_bytes(b"sentencepiece")
    assert check_model_dir(model_src)["tokenizer"] == "tokenizer.model"
    (model_src / "tokenizer.model").unlink()
    (model_src / "vocab.json").write_text("{}")
    (model_src / "merges.txt").write_text("#version: 0.2\n")
    assert check_model_dir(model_src)["tokenizer"] == "vocab.json+merges.txt"


def test_index_naming_a_missing_shard(model_src):
    (model_src / SHARDS[1]).unlink()
    _fails(model_src, SHARDS[1], "1 are missing")


def test_broken_index(model_src):
    (model_src / "model.safetensors.index.json").write_text("{not json")
    _fails(model_src, "model.safetensors.index.json", "weight_map")
    (model_src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _fails(model_src, "weight_map")


def test_truncated_shard(model_src):
    path = model_src / SHARDS[0]
    path.write_bytes(path.read_bytes()[:-100])
    _fails(model_src, "truncated", SHARDS[0])


def test_config_problems(model_src):
    (model_src / "config.json").write_text('{"architectures": []}')
    _fails(model_src, "model_type")
    (model_src / "config.json").write_text("{")
    _fails(model_src, "config.json", "not valid JSON")
    (model_src / "config.json").unlink()
    _fails(model_src, "no config.json")


def test_advice_depends_on_where_the_model_came_from(model_src):
    (model_src / "config.json").unlink()
    with pytest.raises(SftjobsError, match="model.path"):
        check_model_dir(model_src, hub=False)
    with pytest.raises(SftjobsError, match="re-run the model step"):
        check_model_dir(model_src, hub=True)


# --- the real thing: the demo model through the hub, loaded by transformers --------------------


@pytest.mark.train
def test_demo_model_downloads_and_loads(tmp_path):
    pytest.importorskip("transformers")
    from sftjobs.io.demo_assets import make_demo_model, synthetic_pairs

    src = make_demo_model(tmp_path / "src", [q + " " + a for q, a in synthetic_pairs(50)], log=lambda _: None)
    with hub_server({("model", REPO): src}) as hub:
        rc, out = fetch(tmp_path, hub.url)
    assert rc == 0, out
    local = Path(out["path"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert model.config.model_type == "qwen2"
    assert out["summary"]["n_params"] == sum(p.numel() for p in model.parameters())
    assert tokenizer.eos_token == "<|im_end|>"
