"""`open_engine`: the generation engine `generate.engine` names (its types: sampling.py)."""
from __future__ import annotations

from pathlib import Path

from common.config import Config
from stages.generate.sampling import GenerationEngine


def open_engine(config: Config, checkpoint: Path) -> GenerationEngine:
    """The engine `generate.engine` names, loaded with `checkpoint`."""
    if config.generate.engine == "vllm":
        from stages.generate.vllm_engine import VllmEngine  # vLLM only where it is asked for

        return VllmEngine(checkpoint, config)
    from stages.generate.hf_engine import HfEngine

    return HfEngine(checkpoint, config.generate.kv_cache_gib)
