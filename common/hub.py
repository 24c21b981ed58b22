"""Where a model the config names lives. Torch-free, so the controller can resolve models before it
imports any model code."""
from __future__ import annotations

from pathlib import Path


def local_model_dir(name: str | Path) -> Path:
    """A local folder as is; a hub id resolved to its downloaded snapshot (safetensors only)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
