"""The byte tokenizer: 256 byte values offset by 4 special ids, as in the released BLT models.

This is the only place that knows how bytes map to ids, and the one list of the special ids.
"""

from __future__ import annotations

from typing import Iterable

from blt_decode.errors import InvalidRequestError

BOE_ID = 0  #: beginning of entity (unused by generation, kept for checkpoint compatibility)
BOS_ID = 1  #: beginning of sequence; every sequence the model sees starts with it
EOS_ID = 2  #: end of sequence; generation stops when it is produced
PAD_ID = 3  #: padding (also called BPE id in the public code)
MASK_ID = BOE_ID  #: the [MASK] of block diffusion: BOE, which generation never emits and nothing else uses
OFFSET = 4  #: byte b has id b + OFFSET
VOCAB_SIZE = 256 + OFFSET

SPECIAL_NAMES = {BOE_ID: "<boe>", BOS_ID: "<bos>", EOS_ID: "<eos>", PAD_ID: "<pad>"}


def to_bytes(text: str | bytes | bytearray) -> bytes:
    """Text as bytes: ``str`` is encoded as UTF-8, bytes pass through; anything else, or a ``str`` that is
    not valid Unicode (a lone surrogate), is an :class:`~blt_decode.errors.InvalidRequestError`."""
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"a str that is not valid Unicode ({exc.reason} at index {exc.start}); pass the raw bytes instead"
            ) from None
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise InvalidRequestError(f"expected str or bytes, got {type(text).__name__}")


def encode(text: str | bytes | bytearray, *, add_bos: bool = True) -> list[int]:
    """Token ids for ``text``, starting with BOS unless ``add_bos`` is false."""
    ids = [b + OFFSET for b in to_bytes(text)]
    return [BOS_ID, *ids] if add_bos else ids


def is_byte(token_id: int) -> bool:
    """Whether ``token_id`` is a byte's id (not a special id, and inside the vocabulary)."""
    return OFFSET <= token_id < VOCAB_SIZE


def decode(ids: Iterable[int]) -> bytes:
    """Bytes for the byte ids in ``ids``; special ids are dropped."""
    return bytes(i - OFFSET for i in ids if is_byte(i))


def display(data: bytes) -> str:
    """Lenient text for showing bytes to a person (invalid UTF-8 becomes U+FFFD)."""
    return data.decode("utf-8", errors="replace")
