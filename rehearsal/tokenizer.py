"""Qwen3's tokenizer, rebuilt offline and exactly from the BPE ranks that one PyPI wheel ships.

Nothing in the project had run at Qwen3's real vocabulary (151,643 byte-level BPE tokens, 26 added
tokens, 151,936 embedding rows), and model downloads are not possible here. The `dashscope` wheel
on PyPI carries Qwen's vocabulary as `dashscope/resources/qwen.tiktoken` (the same ranks as Qwen2 and
Qwen3), so the builder fetches that one wheel with pip, checks it and the extracted file against
pinned sha256s, derives the BPE merges from the ranks, and writes an HF fast tokenizer with Qwen3's
pre-tokenizer, normalizer, added tokens and chat template. The written files are checked against
`qwen3_tokenizer.sha256` beside this module: a build that differs (other ranks, another
`tokenizers` or `transformers` version) is an error, not a silent new tokenizer.

    python -m rehearsal.tokenizer --out assets/qwen3-tokenizer
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

# The wheel is only a carrier of one data file, never a dependency: pinned by version and digest so a
# re-upload or a newer release cannot change the vocabulary under us.
DASHSCOPE_VERSION = "1.27.8"
DASHSCOPE_WHEEL = f"dashscope-{DASHSCOPE_VERSION}-py3-none-any.whl"
DASHSCOPE_WHEEL_SHA256 = "540caab73850718b83fa71d0bfb5cacd70cfe7f981298f768e0a7304091a5eb3"
RANKS_MEMBER = "dashscope/resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
RANKS_COUNT = 151_643

DEFAULT_WHEEL_DIR = Path(".cache/wheels")
CHECKSUMS = Path(__file__).with_name("qwen3_tokenizer.sha256")

# Qwen2/Qwen3's split before BPE: like cl100k's, but digits stay single (\p{N}, not \p{N}{1,3}), so
# every number is read digit by digit. Same string as transformers' Qwen2 PRETOKENIZE_REGEX and the
# Split pattern of Qwen3's tokenizer.json.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class AddedTokenSpec:
    id: int
    content: str
    special: bool  # special tokens are dropped by decode(skip_special_tokens=True); the others stay text


# Qwen3's added tokens right after the BPE ranks, in id order. Only the first 14 are special: the tool,
# FIM and think markers decode as text, so a response's "<think>" survives skip_special_tokens.
ADDED_TOKENS = [
    AddedTokenSpec(151643, "<|endoftext|>", True),
    AddedTokenSpec(151644, "<|im_start|>", True),
    AddedTokenSpec(151645, "<|im_end|>", True),
    AddedTokenSpec(151646, "<|object_ref_start|>", True),
    AddedTokenSpec(151647, "<|object_ref_end|>", True),
    AddedTokenSpec(151648, "<|box_start|>", True),
    AddedTokenSpec(151649, "<|box_end|>", True),
    AddedTokenSpec(151650, "<|quad_start|>", True),
    AddedTokenSpec(151651, "<|quad_end|>", True),
    AddedTokenSpec(151652, "<|vision_start|>", True),
    AddedTokenSpec(151653, "<|vision_end|>", True),
    AddedTokenSpec(151654, "<|vision_pad|>", True),
    AddedTokenSpec(151655, "<|image_pad|>", True),
    AddedTokenSpec(151656, "<|video_pad|>", True),
    AddedTokenSpec(151657, "<tool_call>", False),
    AddedTokenSpec(151658, "</tool_call>", False),
    AddedTokenSpec(151659, "<|fim_prefix|>", False),
    AddedTokenSpec(151660, "<|fim_middle|>", False),
    AddedTokenSpec(151661, "<|fim_suffix|>", False),
    AddedTokenSpec(151662, "<|fim_pad|>", False),
    AddedTokenSpec(151663, "<|repo_name|>", False),
    AddedTokenSpec(151664, "<|file_sep|>", False),
    AddedTokenSpec(151665, "<tool_response>", False),
    AddedTokenSpec(151666, "</tool_response>", False),
    AddedTokenSpec(151667, "<think>", False),
    AddedTokenSpec(151668, "</think>", False),
]
# The pipeline stops sampling at EOS: chat turns end with <|im_end|> (the Qwen3 chat models' EOS; the
# Base models' own config names <|endoftext|>, which a chat-formatted student rarely emits).
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# As Qwen3-4B-Base's tokenizer_config.json says (the models' own max_position_embeddings is 32768).
MODEL_MAX_LENGTH = 131072

# Qwen3's chat template for the conversations this project renders: system, user and assistant turns,
# the generation prompt, and `enable_thinking=False` appending the empty think block. As in Qwen3's:
# an assistant turn after the last user turn is written with its think block (empty when it has no
# reasoning) when it is the last message or has reasoning; earlier assistant turns lose their
# reasoning (`reasoning_content`, or the text before `</think>`). Omitted: tools (the tool system
# block, assistant tool_calls, `tool` messages) and non-string contents; those raise instead of
# rendering something the real template would not.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- raise_exception('this Qwen3 chat template does not render tools') }}
{%- endif %}
{#- The last real user turn: assistant turns after it keep their think block. #}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages %}
    {%- if message['content'] is not string %}
        {{- raise_exception('this Qwen3 chat template renders string contents only') }}
    {%- endif %}
    {%- set content = message['content'] %}
    {%- if message['role'] == 'user' and not (content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
        {%- set ns.last_query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message['role'] == 'system' or message['role'] == 'user' %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- set reasoning = '' %}
        {%- if message['reasoning_content'] is defined and message['reasoning_content'] is not none %}
            {%- set reasoning = message['reasoning_content'] %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('this Qwen3 chat template renders system, user and assistant turns, not ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


class BuildError(RuntimeError):
    """A build step failed in a way the user can fix; the message is the whole `error: ... (fix: ...)` line."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(wheel_dir: Path = DEFAULT_WHEEL_DIR) -> Path:
    """The pinned dashscope wheel, downloaded with pip on first use and checked against its sha256.

    `pip download --no-deps` fetches the one file and installs nothing, so the package never becomes
    a dependency; a cached wheel is reused (the build then needs no network).
    """
    wheel = Path(wheel_dir) / DASHSCOPE_WHEEL
    if not wheel.is_file():
        Path(wheel_dir).mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", f"dashscope=={DASHSCOPE_VERSION}", "--no-deps",
                   "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "-d", str(wheel_dir)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"error: pip could not download {DASHSCOPE_WHEEL} ({last}) "
                             f"(fix: reach PyPI, or put that wheel in {wheel_dir})")
    digest = sha256_bytes(wheel.read_bytes())
    if digest != DASHSCOPE_WHEEL_SHA256:
        raise BuildError(f"error: {wheel} has sha256 {digest}, not the pinned {DASHSCOPE_WHEEL_SHA256} "
                         f"(fix: delete it and build again)")
    return wheel


def read_ranks(wheel: Path) -> dict[bytes, int]:
    """Qwen's BPE ranks (token bytes -> rank) from the wheel's `qwen.tiktoken`, checked whole.

    Each line is `base64(token bytes) rank`; the ranks must be exactly 0..151642 so that a rank is a
    token id and the merge order at once.
    """
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(RANKS_MEMBER)
    digest = sha256_bytes(data)
    if digest != RANKS_SHA256:
        raise BuildError(f"error: {RANKS_MEMBER} in {wheel} has sha256 {digest}, not the pinned {RANKS_SHA256} "
                         f"(fix: delete {wheel} and build again)")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        encoded, rank = line.split()
        ranks[base64.b64decode(encoded)] = int(rank)
    if sorted(ranks.values()) != list(range(RANKS_COUNT)):
        raise BuildError(f"error: {RANKS_MEMBER} does not hold ranks 0..{RANKS_COUNT - 1} once each "
                         f"(fix: check RANKS_SHA256 in rehearsal/tokenizer.py)")
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: each of the 256 bytes as one printable character.

    BPE files hold strings, not bytes; byte-level BPE therefore writes each byte as a character,
    printable bytes as themselves and the others (control, space, 0x7f-0xa0, 0xad) as the characters
    from U+0100 on, in byte order. The `tokenizers` ByteLevel pre-tokenizer uses this same map, so the
    vocabulary must be spelled with it.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """`token` after byte-level BPE using only the merges whose rank is below `below`.

    Each step merges the adjacent pair whose merged token has the lowest rank (the leftmost on a tie),
    exactly tiktoken's encoding loop.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_at = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_at = rank, i
        if best_at < 0:
            break
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list that the ranks imply, in rank order.

    A tiktoken file stores tokens, not merges: a token of rank r was created by merging two tokens.
    Which two is the split that BPE itself reaches when it runs on the token's bytes with every merge
    of rank below r: it must end in exactly two parts, and (left, right) is merge number r. Tokens of
    one byte are the alphabet and make no merge.
    """
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise BuildError(f"error: token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens "
                             f"(fix: the ranks file is not a byte-level BPE vocabulary; check RANKS_SHA256)")
        merges.append((rank, parts[0], parts[1]))
    merges.sort()
    return [(left, right) for _, left, right in merges]


def _byte_level_decoder() -> decoders.Decoder:
    """The ByteLevel decoder as Qwen's tokenizer.json writes it (all three flags false).

    The decoder ignores those flags, but the Python constructor takes none and would serialize them
    as true; set through the decoder's own JSON state so the written file says what Qwen's says.
    """
    decoder = decoders.ByteLevel()
    decoder.__setstate__(json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                     "use_regex": False}).encode())
    return decoder


def build_backend(ranks: dict[bytes, int]) -> Tokenizer:
    """The `tokenizers` pipeline of Qwen3's tokenizer.json: NFC, regex split, byte-level BPE, added tokens."""
    if len(ranks) != RANKS_COUNT or any(bytes([b]) not in ranks for b in range(256)):
        raise BuildError("error: the ranks lack single bytes, so some text could not be encoded "
                         "(fix: check RANKS_SHA256 in rehearsal/tokenizer.py)")
    alphabet = byte_to_unicode()
    spell = lambda token: "".join(alphabet[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for left, right in derive_merges(ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   byte_fallback=False, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    # The regex does the splitting; ByteLevel only maps bytes to the alphabet (use_regex=False), and
    # adds no prefix space, so " Hello" and "Hello" stay different tokens.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = _byte_level_decoder()
    for spec in ADDED_TOKENS:
        token = AddedToken(spec.content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=spec.special)
        (backend.add_special_tokens if spec.special else backend.add_tokens)([token])
        if backend.token_to_id(spec.content) != spec.id:
            raise BuildError(f"error: {spec.content} got id {backend.token_to_id(spec.content)}, not {spec.id} "
                             f"(fix: ADDED_TOKENS must follow the ranks without a gap)")
    return backend


def build_tokenizer(ranks: dict[bytes, int]) -> PreTrainedTokenizerBase:
    """The transformers tokenizer, saved with `tokenizer_class` Qwen2Tokenizer as Qwen3's folders are.

    With that class name, transformers loads the folder through the same code path as a real Qwen3
    checkpoint's tokenizer, so what this rehearses is what the real models will meet.
    """
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=build_backend(ranks), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None,
        bos_token=None, additional_special_tokens=[s.content for s in ADDED_TOKENS if s.special][1:],
        model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False, split_special_tokens=False,
        add_prefix_space=False, errors="replace")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def read_checksums(path: Path = CHECKSUMS) -> dict[str, str]:
    """file name -> sha256, from a `sha256sum`-style file."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    return sums


def folder_checksums(folder: Path) -> dict[str, str]:
    return {p.name: sha256_bytes(p.read_bytes()) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def write_checksums(sums: dict[str, str], path: Path = CHECKSUMS) -> None:
    Path(path).write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))


def differences(folder: Path, expected: dict[str, str]) -> list[str]:
    """The files of `folder` that are missing, extra or differ from `expected` (empty when identical)."""
    actual = folder_checksums(folder) if Path(folder).is_dir() else {}
    return sorted(name for name in set(actual) | set(expected) if actual.get(name) != expected.get(name))


def write_tokenizer(out: Path, wheel_dir: Path = DEFAULT_WHEEL_DIR, update_checksums: bool = False) -> Path:
    """Build the tokenizer folder at `out`, verified against the committed checksums.

    The files are written beside `out` and moved into place only once they match, so a failed build
    leaves any previous tokenizer untouched. `update_checksums` records the new files' sha256s
    instead (after a deliberate change, e.g. a new `tokenizers` pin).
    """
    out = Path(out)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    build_tokenizer(read_ranks(fetch_wheel(wheel_dir))).save_pretrained(staging)
    if update_checksums:
        write_checksums(folder_checksums(staging))
    wrong = differences(staging, read_checksums())
    if wrong:
        raise BuildError(f"error: built files differ from {CHECKSUMS.name}: {', '.join(wrong)} (kept in {staging}) "
                         f"(fix: check the tokenizers/transformers pins, or rebuild with --update-checksums "
                         f"after a deliberate change)")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def ensure_tokenizer(out: Path, wheel_dir: Path = DEFAULT_WHEEL_DIR) -> Path:
    """`out` as is when its files match the checksums, else built there: cheap to call before every use."""
    if not differences(Path(out), read_checksums()):
        return Path(out)
    return write_tokenizer(out, wheel_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/qwen3-tokenizer"), help="tokenizer folder to write")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEEL_DIR, help="where the dashscope wheel is cached")
    parser.add_argument("--force", action="store_true", help="rebuild even when --out already matches the checksums")
    parser.add_argument("--update-checksums", action="store_true",
                        help=f"record the built files' sha256s in {CHECKSUMS.name} instead of checking them")
    args = parser.parse_args(argv)
    if not (args.force or args.update_checksums) and not differences(args.out, read_checksums()):
        print(f"{args.out}: up to date ({len(read_checksums())} files match {CHECKSUMS.name})")
        return 0
    start = time.perf_counter()
    try:
        write_tokenizer(args.out, args.wheels, args.update_checksums)
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{args.out}: Qwen3 tokenizer built in {time.perf_counter() - start:.1f}s "
          f"({RANKS_COUNT:,} BPE tokens + {len(ADDED_TOKENS)} added tokens; checksums "
          f"{'recorded' if args.update_checksums else 'match'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
