"""The rebuilt Qwen3 tokenizer against public references: Qwen's own files, token ids other projects
recorded from the real tokenizer, and renderings of the real chat template.

They read assets/qwen3-tokenizer as `make qwen3-tokenizer` builds it (a fresh clone: pip downloads the
pinned dashscope wheel from PyPI once, then about 6 s on one core; .ci/run does it before `make test`);
without it they are skipped, so the suite itself never reaches the network.
"""
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import SHARED_DATA, needs_shared
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from common.data import clean_message_text, load_prompts, render_prompt
from rehearsal import tokenizer as qwen3
from rehearsal.prompt_lengths import measure, percentile, summarize
from tiny_world.tokenizer import CHAT_TEMPLATE as TINY_CHAT_TEMPLATE

ASSET = Path("assets/qwen3-tokenizer")


@pytest.fixture(scope="session")
def folder(qwen3_tokenizer_folder) -> Path:
    return qwen3_tokenizer_folder


@pytest.fixture(scope="session")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def backend(folder):
    """tokenizer.json through `tokenizers` alone: the file itself, not transformers' rebuild of it."""
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_the_built_folder_matches_the_committed_checksums(folder, tmp_path):
    assert sorted(qwen3.read_checksums()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert qwen3.differences(folder, qwen3.read_checksums()) == []
    # The check sees a one-byte change and a stray file.
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "chat_template.jinja").write_text((copy / "chat_template.jinja").read_text() + " ")
    (copy / "extra.txt").write_text("x")
    assert qwen3.differences(copy, qwen3.read_checksums()) == ["chat_template.jinja", "extra.txt"]


# sha256 of Qwen/Qwen3-4B-Base's vocab.json and merges.txt, as mirrored in the GitHub repository
# Robojiang/qwen_mlsys (commit 73fd83f73b8b56f2ba8522789584b5a3784303d7, Qwen3-4B-Base/vocab.json and
# Qwen3-4B-Base/merges.txt; a ModelScope download of Qwen/Qwen3-4B-Base, per its .mdl file).
QWEN3_VOCAB_JSON_SHA256 = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
QWEN3_MERGES_TXT_SHA256 = "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"


def test_vocabulary_and_merges_are_byte_identical_to_qwen3s_own_files(folder):
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab_json = json.dumps(dict(sorted(model["vocab"].items(), key=lambda kv: kv[1])), ensure_ascii=False,
                            separators=(",", ":"))
    merges_txt = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in model["merges"])
    assert len(model["vocab"]) == 151_643 and len(model["merges"]) == 151_643 - 256
    assert hashlib.sha256(vocab_json.encode()).hexdigest() == QWEN3_VOCAB_JSON_SHA256
    assert hashlib.sha256(merges_txt.encode()).hexdigest() == QWEN3_MERGES_TXT_SHA256


# Token ids recorded from the real Qwen tokenizer (the same vocabulary and pre-tokenizer in Qwen1.5,
# Qwen2 and Qwen3).
# [T] huggingface/transformers, tests/models/qwen2/test_tokenization_qwen2.py
#     (commit 04bee35c8777d027a981e061f32fc12a1b3265d3), test_tokenizer_integration: the three sequences'
#     unpadded input_ids from Qwen/Qwen-tokenizer.
# [L] ggerganov/llama.cpp, models/ggml-vocab-qwen2.gguf.inp and .out
#     (commit e31d5c63812eaeb412ba1354a6bdf4aeb8a6e5bb): one line of ids per input, written by the HF tokenizer
#     of Qwen/Qwen1.5-7B (the qwen2 entry of its convert_hf_to_gguf_update.py).
# [D] huggingface/transformers, src/transformers/models/qwen2/tokenization_qwen2.py, Qwen2Tokenizer's docstring.
PUBLIC_IDS = [
    ("Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "  # [T]
     "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
     "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
     "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
     [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8,
      5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11,
      27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448,
      11434, 23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459,
      323, 5538, 94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13]),
    ("🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，"  # [T]
     "并且节省从头训练所需要的时间和资源。",
     [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
      104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997,
      33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773]),
    ('```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```',  # [T]
     [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135,
      1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594]),
    ("Hello world", [9707, 1879]),  # [D] and [L]
    (" Hello world", [21927, 1879]),  # [D] and [L]
    ("Hello, world!", [9707, 11, 1879, 0]),  # [L]
    (" Hello, world!", [21927, 11, 1879, 0]),  # [L]
    ("ied 4 ½ months", [1122, 220, 19, 220, 26062, 3951]),  # [L]
    ("Führer", [37, 50753, 261]),  # [L]
    (" ", [220]), ("  ", [256]), ("   ", [262]), ("\t", [197]),  # [L]
    ("\n", [198]), ("\n\n", [271]), ("\n\n\n", [1406]), ("\t\n", [1572]),  # [L]
    ("    Hello\n    Hello", [262, 21927, 198, 262, 21927]),  # [L]
    ("\n =", [198, 284]), ("' era", [6, 11385]),  # [L]
    (" this is 🦙.cpp", [419, 374, 11162, 99, 247, 13, 10821]),  # [L]
    ("w048 7tuijk dsdfhu", [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),  # [L]
    ("нещо на Български", [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012]),  # [L]
    ("Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",  # [L]
     [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16,
      20, 16, 35727, 21216]),
    ("🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)",  # [L]
     [145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 320,
      3243, 42365, 429, 702, 1181, 1828, 3950, 8]),
    ("33333333", [18] * 8),  # [L]: digits are always single tokens
    ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "  # [L]
     "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
     "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
     "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
     [198, 4710, 14731, 65497, 7847, 1572, 2303, 78672, 10947, 145836, 320, 8252, 8, 26525, 114, 378, 235, 149921,
      30543, 320, 35673, 99066, 97534, 8, 25521, 227, 11162, 99, 247, 149955, 220, 18, 220, 18, 18, 220, 18, 18,
      18, 220, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18,
      18, 220, 18, 18, 18, 18, 18, 18, 18, 18, 220, 18, 13, 18, 220, 18, 496, 18, 220, 18, 1112, 18, 220, 146394,
      97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280, 147272, 97529,
      227, 144534, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20, 16, 35727, 21216, 55460, 53237,
      18658, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012, 3355, 4605, 4605, 13874, 13874, 73594, 3014,
      3014, 28149, 17085, 2928, 26610, 7646, 358, 3003, 1012, 364, 83, 813, 566, 594, 1052, 11, 364, 787, 498,
      2704, 30, 364, 44, 537, 2704, 358, 3278, 1281, 432, 11, 364, 35, 498, 1075, 1045, 15243, 30, 1205, 6,
      42612, 264, 63866, 43]),
]


@pytest.mark.parametrize("text,ids", PUBLIC_IDS, ids=[repr(text[:24]) for text, _ in PUBLIC_IDS])
def test_public_qwen_token_ids_are_reproduced(tokenizer, backend, text, ids):
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert backend.encode(text, add_special_tokens=False).ids == ids
    assert tokenizer.decode(ids) == text


def test_nfc_normalization_is_applied_before_bpe(tokenizer, backend):
    # Decomposed forms encode as their composed ones (Qwen2's tokenizer.json has an NFC normalizer;
    # transformers' Qwen2 tokenizer test checks the same three characters).
    decomposed, composed = "\u03d2\u0301\u03d2\u0308\u017f\u0307", "\u03d3\u03d4\u1e9b"
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert encode(decomposed) == encode(composed)
    assert backend.normalizer.normalize_str(decomposed) == composed


# Qwen3's added tokens and which are special, from Qwen/Qwen3-4B-Base's tokenizer_config.json
# (added_tokens_decoder; mirrored in Robojiang/qwen_mlsys, Qwen3-4B-Base/tokenizer_config.json).
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
               "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN3_FIRST_NON_SPECIAL = 151657  # <tool_call>: it and everything after it decode as text


def test_added_tokens_have_qwen3s_ids_and_special_flags(tokenizer):
    assert len(tokenizer) == 151_669
    for token_id, content in enumerate(QWEN3_ADDED, start=151_643):
        assert tokenizer.convert_ids_to_tokens(token_id) == content
        assert tokenizer.encode(f"a{content}b", add_special_tokens=False) == [64, token_id, 65]
        kept = tokenizer.decode([64, token_id, 65], skip_special_tokens=True)
        assert kept == ("ab" if token_id < QWEN3_FIRST_NON_SPECIAL else f"a{content}b"), content
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879], "no BOS/EOS is added to plain text"


def test_the_folder_loads_as_qwen3s_tokenizer_class(folder, tokenizer):
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_enable_thinking_false_renders_qwen3s_non_thinking_prompt(tokenizer):
    # huggingface/transformers issue #37949 printed this rendering by Qwen/Qwen3-30B-A3B's tokenizer; the
    # suffix's exact bytes ('<think>\n\n</think>\n\n') are those of the generation prompt in
    # Qwen/Qwen3-4B-Base's chat_template (Robojiang/qwen_mlsys, Qwen3-4B-Base/tokenizer_config.json).
    rendered = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    assert rendered == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = render_prompt(tokenizer, QUESTION, enable_thinking=False)  # the pipeline's own path
    assert ids[0] == 151644 and ids[-4:] == [151667, 271, 151668, 271]  # <think> "\n\n" </think> "\n\n"


@pytest.mark.parametrize("flag", [{"enable_thinking": True}, {}], ids=["true", "absent"])
def test_enable_thinking_true_or_absent_leaves_the_think_block_out(tokenizer, flag):
    rendered = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, **flag)
    assert rendered == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_a_final_assistant_turn_is_written_with_its_empty_think_block(tokenizer):
    # tyler-griggs/SkyRL, skyrl-train/skyrl_train/utils/templates/README.md: Qwen/Qwen3-0.6B's template
    # on this conversation (no generation prompt).
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")


def test_system_turns_and_earlier_assistant_reasoning_follow_qwen3s_rules(tokenizer):
    # Qwen3's template: a system turn is one more turn; an assistant turn before the last user turn loses
    # its reasoning; the turn after it keeps its reasoning inside the think block.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "<think>\none plus one\n</think>\n\n2"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two plus two"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ntwo plus two\n</think>\n\n4<|im_end|>\n")


def test_tools_and_tool_turns_are_refused_rather_than_rendered_wrongly(tokenizer):
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    with pytest.raises(Exception, match="does not render tools"):
        tokenizer.apply_chat_template(QUESTION, tools=[tool], tokenize=False)
    with pytest.raises(Exception, match="not tool"):
        tokenizer.apply_chat_template(QUESTION + [{"role": "tool", "content": "4"}], tokenize=False)


@pytest.mark.parametrize("flag", [{"enable_thinking": False}, {"enable_thinking": True}, {}],
                         ids=["false", "true", "absent"])
def test_the_tiny_worlds_template_renders_prompts_exactly_as_this_one(tokenizer, flag):
    # The tiny world keeps its own shorter template (its committed asset bytes must not change); on what
    # the pipeline renders (system and user turns plus the generation prompt) the two must agree.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"}]
    ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **flag)
    tiny = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=TINY_CHAT_TEMPLATE, **flag)
    assert ours == tiny


def test_merges_follow_bpe_order_not_any_split():
    # "abc" splits as ab+c (ab is merged before bc), although a+bc would also be two known tokens.
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert qwen3.derive_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
    with pytest.raises(qwen3.BuildError, match="not one merge"):
        qwen3.derive_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_a_wheel_with_another_digest_is_refused(tmp_path):
    (tmp_path / qwen3.DASHSCOPE_WHEEL).write_bytes(b"not the pinned wheel")
    with pytest.raises(qwen3.BuildError, match=r"^error: .* \(fix: delete it and build again\)$"):
        qwen3.fetch_wheel(tmp_path)


def test_prompt_length_percentiles_are_nearest_rank_token_counts():
    values = list(range(1, 101))  # 1..100: the p-th percentile is p itself
    assert [percentile(values, p) for p in (1, 10, 50, 99, 100)] == [1, 10, 50, 99, 100]
    assert percentile([7], 50) == 7 and percentile([3, 9], 50) == 3 and percentile([3, 9], 51) == 9
    assert summarize([5, 2000, 1024, 1025, 3])["over_1024"] == 2


def test_prompt_lengths_count_what_the_pipeline_renders(tokenizer):
    figures = measure(Path("assets/tiny/data/eval.parquet"), tokenizer)  # 500 distinct "What is a + b?" rows
    assert (figures["rows"], figures["kept"], sum(figures["dropped"].values())) == (500, 500, 0)
    # Digits are single tokens, so the shortest prompt has two 1-digit operands and the longest two 3-digit ones.
    rendered = lambda a, b: len(render_prompt(tokenizer, [{"role": "user", "content": (  # noqa: E731
        f"What is {a} + {b}? Please reason step by step, and put your final answer within \\boxed{{}}.")}], False))
    assert (figures["prompt_tokens"]["min"], figures["prompt_tokens"]["max"]) == (rendered(1, 2), rendered(123, 456))
    assert figures["prompt_tokens"]["over_1024"] == 0


@needs_shared
def test_batched_rendering_gives_each_prompt_the_ids_it_has_alone(tokenizer, backend, tmp_path):
    """load_prompts tokenizes every rendered prompt in one call; the reference tokenizes each text alone,
    with `tokenizers` itself. A cap inside the lengths' range checks that the drops follow the right ids."""
    rows = pq.read_table(SHARED_DATA / "dapo-math-17k-boxed-template.parquet").slice(0, 300)
    pq.write_table(rows, tmp_path / "dapo.parquet")
    cap = 110  # about DAPO's median prompt in Qwen3 tokens
    prompt_set = load_prompts(tmp_path / "dapo.parquet", tokenizer, cap, enable_thinking=False)
    alone, seen = {}, set()
    for row in rows.to_pylist():
        messages = [{**m, "content": clean_message_text(m["content"])} for m in row["prompt"]]
        if (key := "\n".join(m["content"] for m in messages)) in seen:
            continue  # a repeated prompt text: dropped before rendering
        seen.add(key)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        alone[str(row["extra_info"]["index"])] = backend.encode(text, add_special_tokens=False).ids
    kept = {p.prompt_id: p.prompt_ids for p in prompt_set.prompts}
    assert kept and all(ids == alone[prompt_id] and len(ids) <= cap for prompt_id, ids in kept.items())
    too_long = [prompt_id for prompt_id, ids in alone.items() if len(ids) > cap]
    assert prompt_set.dropped["too_long"] == len(too_long) > 0 and not set(too_long) & set(kept)
    assert len(kept) + prompt_set.dropped["too_long"] == len(alone)
