"""A tiny random-weight llama model written as GGUF, for the demo and the tests.

Real loading and inference through llama.cpp, meaningless text, all of it
printable. The tokenizer is llama's SentencePiece-style vocabulary: `<unk>`,
`<s>`, `</s>`, `▁`, the 256 tokens `<0x00>` … `<0xFF>` (so any text
tokenizes through byte fallback: llama.cpp finds a byte's token by that
name), then 2000 made-up words (`▁bako`, `▁rite`, …) so that what it
generates reads as words. Only the tokens of newline and the printable ASCII
characters are byte tokens, which decode to their byte; the other 160
(control characters, and the bytes of UTF-8 sequences, which would make any
character, C1 controls and bidi marks included) are normal tokens, which
decode to their name, e.g. `<0x1B>`, never to an escape. So everything it
generates is printable ASCII and newlines, and every token decodes to at
least one character. No token is two characters long, so no two characters
of a prompt ever merge: a prompt is one token per character (byte, for
non-ASCII), as with bytes alone. Deterministic: the same seed writes the
same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
CONTEXT = 4096
# A chat template llama.cpp's Jinja engine runs; `--jinja` lets tools pass through.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + ': ' + (message['content'] if message['content'] is string else '') + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def printable_byte(byte: int) -> bool:
    """Whether a byte decodes to itself in generated text: newline and printable ASCII (space to tilde)."""
    return byte == 0x0A or 0x20 <= byte <= 0x7E


WORDS = 2000
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def words(seed: int = 0) -> list[str]:
    """Made-up two-syllable words (`▁` and four letters: never two characters, so a prompt's characters never
    merge into one), picked by ``seed``."""
    every = [f"▁{a}{b}" for a in SYLLABLES for b in SYLLABLES]
    picked = np.random.default_rng(seed).choice(len(every), size=WORDS, replace=False)
    return [every[i] for i in sorted(picked)]


def vocabulary(seed: int = 0) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>", "▁"] + [f"<0x{b:02X}>" for b in range(256)] + words(seed)
    types = (
        [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.NORMAL]
        + [TokenType.BYTE if printable_byte(b) else TokenType.NORMAL for b in range(256)]
        + [TokenType.NORMAL] * WORDS
    )
    return tokens, [int(t) for t in types]


def write_demo_model(path: Path, name: str = "fleet-demo", seed: int = 0, reranker: bool = False) -> Path:
    """Write the model to ``path`` atomically (temporary file, then rename). ``reranker``: a reranker, whose
    pooling is `rank` (llama-server's `--reranking` scores a document by its embedding's first element; the
    scores are as meaningless as the text)."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary(seed)
    n_vocab = len(tokens)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    if reranker:
        writer.add_pooling_type(gguf.PoolingType.RANK)
    # numpy shapes are (rows, columns) = GGUF's dimensions reversed.
    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for part in ("q", "k", "v", "output"):
            writer.add_tensor(f"blk.{i}.attn_{part}.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(N_EMBD, N_FF))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path
