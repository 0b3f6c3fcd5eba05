"""Tokens as the HTTP API shows them: bytes are the tokens, and how logprobs and tokenizer endpoints say so
(docs/serving.md)."""

from __future__ import annotations

import codecs
from typing import Any, Sequence

import numpy as np

from blt_decode.model import tokenizer
BOS = 256  #: the API id of the sequence start (every sequence has it; a prompt may begin with it)
EOS = 257  #: the API id of the end of the sequence
SPECIAL = {BOS: "<bos>", EOS: "<eos>"}
#: most tokens one /tokenize or /detokenize call takes (the request body limit bounds them too)
MAX_TOKENS = 1 << 20


def api_id(model_id: int) -> int:
    """The API id of a model id (a byte id or EOS)."""
    if model_id == tokenizer.EOS_ID:
        return EOS
    if model_id == tokenizer.BOS_ID:
        return BOS
    return model_id - tokenizer.OFFSET


def token_text(token: int) -> str:
    """How a token (an API id) is shown: the ASCII character, ``bytes:\\xNN``, or ``<bos>``/``<eos>``."""
    if token in SPECIAL:
        return SPECIAL[token]
    return chr(token) if token < 0x80 else f"bytes:\\x{token:02x}"


def token_bytes(token: int) -> list[int]:
    """The bytes of a token (none for the special ones): OpenAI's ``bytes`` field of chat logprobs."""
    return [] if token in SPECIAL else [token]


def tokenize(text: str, add_special_tokens: bool = False) -> list[int]:
    """API ids of ``text``: its UTF-8 bytes (``<bos>``/``<eos>`` alone: the special id); with
    ``add_special_tokens``, BOS first."""
    special = {name: token for token, name in SPECIAL.items()}
    ids = [special[text]] if text in special else list(tokenizer.to_bytes(text))
    return [BOS, *ids] if add_special_tokens else ids


def detokenize(tokens: Sequence[int]) -> str:
    """The text of API ids (bytes decoded leniently, special ids by name)."""
    out, run = [], bytearray()
    for token in tokens:
        if token in SPECIAL:
            out.append(tokenizer.display(bytes(run)))
            run.clear()
            out.append(SPECIAL[token])
        else:
            run.append(token)
    out.append(tokenizer.display(bytes(run)))
    return "".join(out)


def text_offsets(data: bytes, start: int = 0) -> list[int]:
    """For each byte of ``data``, the character offset (from ``start``) of the character it belongs to
    in the text shown for ``data`` (invalid bytes are one U+FFFD each, as :func:`tokenizer.display`)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, chars = [], start
    for byte in data:
        offsets.append(chars)
        chars += len(decoder.decode(bytes([byte])))
    return offsets


def _alternatives(ids: np.ndarray, logprobs: np.ndarray) -> list[tuple[int, float]]:
    return [(api_id(int(i)), float(lp)) for i, lp in zip(ids, logprobs)]


def completion_logprobs(data: bytes, logprobs: np.ndarray, top_ids: np.ndarray | None, top_logprobs: np.ndarray | None,
                        *, bos: bool = False, offset_start: int = 0) -> dict[str, Any]:
    """The ``logprobs`` object of a ``/v1/completions`` choice for the bytes ``data`` (each with its
    log-probability given the bytes before it and, when asked, the top alternatives). With ``bos``,
    the sequence-start token comes first, without a log-probability (nothing predicts it)."""
    tokens = [token_text(b) for b in data]
    token_logprobs: list[float | None] = [float(v) for v in logprobs]
    top: list[dict[str, float] | None] = []
    for i in range(len(data)):
        top.append({} if top_ids is None else {token_text(t): lp for t, lp in _alternatives(top_ids[i], top_logprobs[i])})
    offsets = text_offsets(data, offset_start)
    if bos:
        tokens, token_logprobs, top, offsets = ["<bos>", *tokens], [None, *token_logprobs], [None, *top], [offset_start, *offsets]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(data: bytes, logprobs: np.ndarray, top_ids: np.ndarray | None,
                  top_logprobs: np.ndarray | None) -> dict[str, Any]:
    """The ``logprobs`` object of a ``/v1/chat/completions`` choice: per byte its token text, bytes,
    log-probability and the top alternatives."""
    content = []
    for i, byte in enumerate(data):
        alternatives = [] if top_ids is None else _alternatives(top_ids[i], top_logprobs[i])
        content.append({"token": token_text(byte), "logprob": float(logprobs[i]), "bytes": token_bytes(byte),
                        "top_logprobs": [{"token": token_text(t), "logprob": lp, "bytes": token_bytes(t)}
                                         for t, lp in alternatives]})
    return {"content": content, "refusal": None}
