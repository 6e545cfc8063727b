"""Resolve an adapter reference to a local folder: a path, or a Hugging Face Hub repo id.

Repo ids go through ``huggingface_hub.snapshot_download``, so the local hub cache is used first and
``HF_HUB_OFFLINE=1`` works with what is cached.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import AdapterFileError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_PATTERNS = ["adapter_config.json", "*.safetensors", "*.bin"]


def resolve(reference: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for ``reference``; a clear error if it is neither a folder nor a reachable repo."""
    path = Path(reference)
    if path.is_dir() or not _REPO_ID.match(str(reference)):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(reference), revision=revision, allow_patterns=_PATTERNS))
    except Exception as exc:
        raise AdapterFileError(
            f"{reference!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "pass a folder path, or check the repo id, the network or HF_HUB_OFFLINE and the hub cache"
        ) from exc
