"""download_data_file against a local stand-in for the Hugging Face hub (tests/hubserver.py).

Each download runs in a fresh interpreter: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it
is imported, exactly as it does on a compute node, so patching its module constants in-process would
test something other than what runs for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hubserver import HubRepo, HubServer, hub_env, run_download
from synthetic_data import ArpoSynth

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "dongguanting/ARPO-SFT-54K"
FILENAME = "final_5w4_still.jsonl"

_RUNNER = """
import json, os, sys, time
if os.environ.get("TEST_NO_BACKOFF"):
    time.sleep = lambda seconds: None  # huggingface_hub retries a dead hub with ~25 s of backoff
from pathlib import Path
from sftjobs.errors import SftjobsError
from sftjobs.io.data_files import download_data_file
repo, filename, local_dir, revision = sys.argv[1:5]
try:
    path = download_data_file(repo, filename, Path(local_dir), revision or None)
except SftjobsError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(2)
print(json.dumps({"path": str(path)}))
"""


def _payload() -> bytes:
    synth = ArpoSynth(seed=3, approx_bytes=1500)
    return b"".join(json.dumps(synth.sharegpt(i)).encode() + b"\n" for i in range(200))


def _download(
    tmp_path: Path,
    endpoint: str,
    *,
    repo: str = REPO,
    filename: str = FILENAME,
    revision: str = "",
    offline: bool = False,
    token: str | None = None,
    no_backoff: bool = False,
) -> tuple[int, dict]:
    env = hub_env(endpoint, tmp_path / "hf_home", offline=offline, token=token, no_backoff=no_backoff)
    return run_download(_RUNNER, [repo, filename, str(tmp_path / "data"), revision], env)


@pytest.fixture
def hub():
    with HubServer([HubRepo(REPO, {FILENAME: _payload(), "README.md": b"# card\n"}, repo_type="dataset")]) as server:
        yield server


def test_downloads_dataset_file_via_resolve_endpoint(tmp_path, hub):
    rc, out = _download(tmp_path, hub.url)
    assert rc == 0, out
    path = Path(out["path"])
    assert path == (tmp_path / "data" / FILENAME).resolve()
    assert path.read_bytes() == _payload()
    resolves = hub.requests_for(f"/datasets/{REPO}/resolve/main/{FILENAME}")
    assert [r.method for r in resolves] == ["HEAD", "GET"]
    # No token in the environment => no credentials sent; and nothing went to a Xet endpoint.
    assert all("authorization" not in {k.lower() for k in r.headers} for r in hub.requests)
    assert not [r for r in hub.requests if "xet" in r.path.lower()]


def test_second_download_reuses_local_file(tmp_path, hub):
    assert _download(tmp_path, hub.url)[0] == 0
    before = (tmp_path / "data" / FILENAME).stat().st_mtime_ns
    hub.requests.clear()
    assert _download(tmp_path, hub.url)[0] == 0
    assert [r.method for r in hub.requests] == ["HEAD"]  # etag matched: no GET
    assert (tmp_path / "data" / FILENAME).stat().st_mtime_ns == before


def test_token_comes_from_environment_and_is_not_written(tmp_path):
    secret = "hf_test_secret_token_123"
    repo = HubRepo(REPO, {FILENAME: _payload()}, repo_type="dataset", gated=True, token=secret)
    with HubServer([repo]) as hub:
        rc, out = _download(tmp_path, hub.url)
        assert rc == 2
        assert "gated" in out["error"] and "HF_TOKEN" in out["error"]
        rc, out = _download(tmp_path, hub.url, token=secret)
        assert rc == 0, out
        assert hub.requests[-1].headers.get("authorization") == f"Bearer {secret}"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_missing_file_names_repo_and_file(tmp_path, hub):
    rc, out = _download(tmp_path, hub.url, filename="final_sft_edition9.json")
    assert rc == 2
    assert "final_sft_edition9.json" in out["error"] and REPO in out["error"] and "data.hub_file" in out["error"]


def test_missing_repo_and_revision(tmp_path, hub):
    rc, out = _download(tmp_path, hub.url, repo="nobody/nothing")
    assert rc == 2 and "nobody/nothing" in out["error"] and "HF_TOKEN" in out["error"]
    rc, out = _download(tmp_path, hub.url, revision="v9")
    assert rc == 2 and "'v9'" in out["error"] and "data.revision" in out["error"]


def test_offline_with_nothing_cached_is_a_clear_error(tmp_path, hub):
    rc, out = _download(tmp_path, hub.url, offline=True)
    assert rc == 2
    assert "HF_HUB_OFFLINE" in out["error"] and FILENAME in out["error"] and REPO in out["error"]
    assert hub.requests == []  # offline means offline


def test_offline_uses_an_earlier_download(tmp_path, hub):
    assert _download(tmp_path, hub.url)[0] == 0
    hub.requests.clear()
    rc, out = _download(tmp_path, hub.url, offline=True)
    assert rc == 0, out
    assert Path(out["path"]).read_bytes() == _payload()
    assert hub.requests == []


def test_unreachable_hub_is_a_clear_error(tmp_path):
    with HubServer() as hub:
        dead = hub.url  # a port that was just free and is closed again
    rc, out = _download(tmp_path, dead, no_backoff=True)
    assert rc == 2
    assert "reach" in out["error"] and "HF_ENDPOINT" in out["error"]
