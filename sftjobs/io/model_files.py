"""The model step: get the base model onto disk (or take a local one) and check it is trainable.

Downloads go through ``huggingface_hub.snapshot_download`` into ``model.local_dir``: it skips files
already there (and resumes a file after a dropped connection within one run), honours HF_HUB_OFFLINE
and HF_ENDPOINT; the token is HF_TOKEN from the environment and nothing else (not a stored login). sftjobs never
takes a token as an argument, never puts one on a command line and never writes one to disk.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from sftjobs.errors import SftjobsError

# What training needs from a model repo. Weights are fetched as safetensors; pytorch_model*.bin only
# when the repo has no safetensors at all (a second, narrower pass), so a repo that ships both is
# not downloaded twice. *.py is for trust_remote_code models.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "*.txt",  # merges.txt, vocab.txt
    "*.jinja",  # chat_template.jinja
    "*.py",
    "tokenizer*",
]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]
# Mistral-format duplicates of the transformers weights (transformers never reads them).
IGNORE_PATTERNS = ["consolidated*.safetensors", "original/*"]

# huggingface_hub >= 1.x keeps finished files and drops a half-written one (it only resumes a file
# within one process, after a dropped connection), so a re-run fetches what is missing.
_RESUMES = "(finished files are kept, only missing ones are fetched)"

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _what_to_do(hub: bool) -> str:
    if hub:
        return f"re-run the model step {_RESUMES}, or set model.path to a complete local copy"
    return "point model.path at a complete Hugging Face model folder, or unset it to download model.hub_id"


def fetch_model(
    *,
    hub_id: str | None,
    local_dir: Path | None,
    path: Path | None,
    revision: str | None = None,
    log=print,
) -> Path:
    """Return a checked model folder: ``path`` as is, else ``hub_id`` downloaded into ``local_dir``."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise SftjobsError(
                f"model.path {path} is not a folder; point model.path at a Hugging Face model folder "
                "(config.json, tokenizer, *.safetensors), or unset it to download model.hub_id"
            )
        summary = check_model_dir(path, hub=False)
        log(f"model: using local {path} ({_describe(summary)})")
        return path

    if not hub_id:
        raise SftjobsError("model: set model.hub_id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or model.path")
    if local_dir is None:
        raise SftjobsError(f"model: model.local_dir is not set; say where {hub_id} should be downloaded to")
    local_dir = Path(local_dir).expanduser()
    local_dir.mkdir(parents=True, exist_ok=True)

    log(f"model: fetching {hub_id}{'@' + revision if revision else ''} into {local_dir}")
    warnings = _download(hub_id, local_dir, revision, ALLOW_PATTERNS)
    if not any(local_dir.glob("*.safetensors")):
        # No safetensors in the repo: fall back to PyTorch pickles (only those).
        warnings += _download(hub_id, local_dir, revision, BIN_PATTERNS)
    try:
        summary = check_model_dir(local_dir, hub=True)
    except SftjobsError as exc:
        why = next((w for w in warnings if "cannot be accessed" in w or "Couldn't access" in w), None)
        if why is None:
            raise
        offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
        raise SftjobsError(f"{exc}\nNothing new was downloaded{offline}: {why}") from exc
    log(f"model: {local_dir} ok ({_describe(summary)})")
    return local_dir


def _download(hub_id: str, local_dir: Path, revision: str | None, patterns: list[str]) -> list[str]:
    """snapshot_download with the hub's errors turned into SftjobsError; returns the hub's warnings."""
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:  # pragma: no cover - an install problem, not a user input problem
        raise SftjobsError(
            "model: huggingface_hub is not installed; install sftjobs with its dependencies "
            "(pip install -e .) or set model.path to a local model folder"
        ) from exc

    offline = _offline()
    where = f"{hub_id} (into {local_dir})"
    try:
        with _HubWarnings() as caught:
            huggingface_hub.snapshot_download(
                repo_id=hub_id,
                repo_type="model",
                revision=revision,
                local_dir=str(local_dir),
                allow_patterns=patterns,
                ignore_patterns=IGNORE_PATTERNS,
                token=env_token(),
            )
    except hf_errors.GatedRepoError as exc:
        raise SftjobsError(
            f"model: {hub_id} is gated and the hub refused access; accept its licence on the model page, "
            "then export HF_TOKEN=<a token of that account> before re-running the model step"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        token_hint = "" if os.environ.get("HF_TOKEN") else " (or private: export HF_TOKEN)"
        raise SftjobsError(
            f"model: {hub_id} was not found on the hub{token_hint}; check model.hub_id's spelling"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise SftjobsError(f"model: {hub_id} has no revision {revision!r}; fix model.revision") from exc
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
        # Raised offline (HF_HUB_OFFLINE) or when the hub cannot be reached, with nothing usable on disk.
        if offline:
            incomplete = getattr(hf_errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x
            detail = f" ({_first_line(exc)})" if isinstance(exc, incomplete) else ""
            raise SftjobsError(
                f"model: HF_HUB_OFFLINE is set and {where} has no complete local copy{detail}; download it "
                "on a machine with internet access (unset HF_HUB_OFFLINE) or set model.path to a local copy"
            ) from exc
        raise SftjobsError(
            f"model: could not reach the hub ({_endpoint()}) for {where} and no local copy exists: "
            f"{_first_line(exc)}; check the network or HF_ENDPOINT, or set model.path to a local copy"
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise SftjobsError(
            f"model: the hub ({_endpoint()}) answered with an error for {where}: {_first_line(exc)}; "
            f"re-run the model step later {_RESUMES}, or set model.path to a local copy"
        ) from exc
    except (OSError, ValueError) as exc:
        # A full disk, a local_dir that is not writable, a response without the hub's headers.
        raise SftjobsError(
            f"model: downloading {where} failed: {type(exc).__name__}: {_first_line(exc)}; check the "
            f"network, HF_ENDPOINT and free space in model.local_dir, then re-run the model step {_RESUMES}"
        ) from exc
    except Exception as exc:
        # httpx's transport errors (the hub library's HTTP client) do not derive from OSError.
        if type(exc).__module__.split(".")[0] in {"httpx", "httpcore"}:
            raise SftjobsError(
                f"model: could not download {where} from {_endpoint()}: {type(exc).__name__}: "
                f"{_first_line(exc)}; check the network or HF_ENDPOINT, then re-run the model step {_RESUMES}"
            ) from exc
        raise
    return caught.messages


class _HubWarnings(logging.Handler):
    """Collects huggingface_hub's warnings during one call.

    When the hub cannot be asked (offline, down, or refusing) but local_dir already has files,
    snapshot_download returns local_dir with only a logged warning; check_model_dir then judges the
    files, and the warning lets its error say why nothing was downloaded.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _HubWarnings:
        logging.getLogger("huggingface_hub").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("huggingface_hub").removeHandler(self)


def env_token() -> str | bool:
    """HF_TOKEN from the environment, or False: huggingface_hub must not fall back to a token file on disk."""
    return os.environ.get("HF_TOKEN") or False


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(summary: dict[str, Any]) -> str:
    params = summary["n_params"]
    p = f"{params / 1e9:.2f}B params" if params >= 1e8 else f"{params} params" if params else "params unknown"
    return (
        f"{summary['model_type']}, {p}, {summary['n_weight_files']} weight file(s), "
        f"{summary['total_bytes'] / 2**30:.2f} GiB"
    )


def check_model_dir(dir: str | os.PathLike, *, hub: bool = True) -> dict[str, Any]:
    """Check that ``dir`` holds a loadable causal LM and summarise it.

    Returns {"path", "model_type", "architectures", "tokenizer", "weight_format", "n_weight_files",
    "total_bytes", "n_params"}. ``n_params`` counts tensors in the safetensors headers (0 for .bin
    weights, which cannot be read without unpickling them). ``hub`` only changes the advice in errors.
    """
    d = Path(dir)
    todo = _what_to_do(hub)
    if not d.is_dir():
        raise SftjobsError(f"model folder {d} does not exist; {todo}")

    config_path = d / "config.json"
    if not config_path.is_file():
        raise SftjobsError(f"model folder {d} has no config.json; {todo}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SftjobsError(f"{config_path} is not valid JSON ({exc}); {todo}") from exc
    if not isinstance(config, dict) or not config.get("model_type"):
        raise SftjobsError(f"{config_path} has no model_type, so transformers cannot load it; {todo}")

    if (d / "tokenizer.json").is_file():
        tokenizer = "tokenizer.json"
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tokenizer = "vocab.json+merges.txt"
    elif (d / "tokenizer.model").is_file():
        tokenizer = "tokenizer.model"
    else:
        raise SftjobsError(
            f"model folder {d} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model); {todo}"
        )

    weights, fmt = _weight_files(d, todo)
    total_bytes = sum(f.stat().st_size for f in weights)
    n_params = 0
    if fmt == "safetensors":
        for f in weights:
            n_params += _safetensors_params(f, todo)
    return {
        "path": str(d),
        "model_type": config["model_type"],
        "architectures": list(config.get("architectures") or []),
        "tokenizer": tokenizer,
        "weight_format": fmt,
        "n_weight_files": len(weights),
        "total_bytes": total_bytes,
        "n_params": n_params,
    }


def _weight_files(d: Path, todo: str) -> tuple[list[Path], str]:
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index_path = d / index_name
        if not index_path.is_file():
            continue
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SftjobsError(f"{index_path} is not a valid weight index (needs a weight_map); {todo}") from exc
        if not shards:
            raise SftjobsError(f"{index_path} lists no weight files; {todo}")
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise SftjobsError(
                f"model folder {d}: {index_name} lists {len(shards)} shard(s) but {len(missing)} are missing "
                f"({shown}); {todo}"
            )
        return [d / s for s in shards], fmt

    safetensors = sorted(d.glob("*.safetensors"))
    if safetensors:
        return safetensors, "safetensors"
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        return bins, "bin"
    raise SftjobsError(f"model folder {d} has no weights (*.safetensors or pytorch_model*.bin); {todo}")


def _safetensors_params(path: Path, todo: str) -> int:
    """Parameter count from a safetensors header: 8-byte little-endian length, then that much JSON."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} does not fit the {size}-byte file")
            header = json.loads(handle.read(n))
        count = 0
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            count += numel
            end = max(end, int(info["data_offsets"][1]))
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise SftjobsError(f"{path} is not a readable safetensors file ({exc}); {todo}") from exc
    if 8 + n + end > size:
        # The usual sign of an interrupted download that left a truncated file under its final name.
        raise SftjobsError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); {todo}")
    return count
