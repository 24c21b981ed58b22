"""The real-width rehearsal models: the public configs' values and parameter counts, and (slow) a seeded
build that the pipeline's loader reads back."""
import hashlib

import pytest
import torch

from common.modeling import load_model
from rehearsal import models
from rehearsal import prompt_lengths as lengths_cli
from rehearsal import tokenizer as tokenizer_cli

# The public config.json values each rehearsal model copies (all but the depth).
# Qwen3-4B-Base: Robojiang/qwen_mlsys, Qwen3-4B-Base/config.json (commit 73fd83f73b8b56f2ba8522789584b5a3784303d7,
#   a ModelScope copy of Qwen/Qwen3-4B-Base).
# Qwen3-1.7B-Base: its config.json as printed in a public agent transcript in the code index (no repository
#   named); the widths agree with keras-team/keras-hub's qwen3_1.7b_en and zyzshishui/slime,
#   scripts/models/qwen3-1.7B.sh (28 layers, hidden 2048, FFN 6144, 16 heads, 8 KV groups, kv-channels 128,
#   rotary base 1e6, vocab 151936).
SHARED = {"vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8, "hidden_act": "silu",
          "rms_norm_eps": 1e-06, "max_position_embeddings": 32768, "tie_word_embeddings": True,
          "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151643}
PUBLIC_CONFIGS = {
    "student": {**SHARED, "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16,
                "num_hidden_layers": 28},
    "teacher": {**SHARED, "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
                "num_hidden_layers": 36},
}
PUBLIC_ROPE_THETA = 1_000_000

# Parameters at full depth (tied embedding counted once): keras-team/keras-hub,
# keras_hub/src/models/qwen3/qwen3_presets.py (commit 1df65dab96fb417c6df011c25802017109e96c66),
# qwen3_1.7b_en 1,720,574,976 and qwen3_4b_en 4,022,468,096 (the same as Qwen/Qwen3-4B's safetensors
# index, total_size 8,044,936,192 bf16 bytes). The model cards round the non-embedding part to 1.4B and
# 3.6B (Robojiang/qwen_mlsys, Qwen3-4B-Base/README.md; the Qwen3-1.7B card).
PUBLIC_PARAMETERS = {"student": (1_720_574_976, 1.4e9), "teacher": (4_022_468_096, 3.6e9)}


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_configs_copy_the_public_widths_and_cut_only_the_depth(role):
    public = PUBLIC_CONFIGS[role]
    config = models.model_config(models.SHAPES[role], layers=2)
    for key, value in public.items():
        assert getattr(config, key) == (2 if key == "num_hidden_layers" else value), key
    assert config.rope_parameters["rope_theta"] == PUBLIC_ROPE_THETA
    assert models.SHAPES[role].num_hidden_layers == public["num_hidden_layers"]


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_full_depth_parameter_counts_are_the_public_ones(role):
    shape = models.SHAPES[role]
    counts = models.parameter_counts(models.model_config(shape, shape.num_hidden_layers))
    total, non_embedding = PUBLIC_PARAMETERS[role]
    assert counts["total"] == total
    assert counts["embedding"] == 151936 * shape.hidden_size
    assert round(counts["non_embedding"] / 1e8) == round(non_embedding / 1e8)


def test_a_model_without_layers_is_refused():
    with pytest.raises(models.BuildError, match=r"^error: --layers 0 .*\(fix: "):
        models.model_config(models.SHAPES["student"], 0)


@pytest.mark.slow
def test_a_seeded_build_is_reproducible_and_loads_with_the_pipelines_loader(tmp_path, qwen3_tokenizer_folder):
    tokenizer = qwen3_tokenizer_folder
    digests = []
    for attempt in ("a", "b"):
        folder = models.write_model("student", tmp_path / attempt, tokenizer, layers=1, seed=0)
        digests.append(hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert sorted(p.name for p in folder.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                         "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model = load_model(folder, torch.bfloat16)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings stay tied"
    assert sum(p.numel() for p in model.parameters()) == models.parameter_counts(
        models.model_config(models.SHAPES["student"], 1))["total"]
    logits = model(torch.tensor([[9707, 11, 1879, 0]])).logits
    assert logits.shape == (1, 4, 151936) and torch.isfinite(logits).all()



@pytest.mark.parametrize("cli", [tokenizer_cli, models, lengths_cli], ids=["tokenizer", "models", "prompt_lengths"])
def test_rehearsal_entry_points_answer_help(cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m {cli.__name__}")


def test_a_missing_data_folder_is_one_error_line_naming_the_fix(capsys):
    assert lengths_cli.main(["--data", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: /nonexistent lacks dapo-math-17k-boxed-template.parquet")
    assert "(fix: " in err
