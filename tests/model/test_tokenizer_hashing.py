import torch

from blt_decode.model import tokenizer
from blt_decode.model.hashing import HASH_PRIMES, hash_table_ids, ngram_hash_ids


def wrap64(x: int) -> int:
    return (x + 2**63) % 2**64 - 2**63


def hand_hash(ids: list[int], n: int, prime: int, buckets: int) -> list[int]:
    padded = [0] * (n - 1) + ids
    out = []
    for t in range(len(ids)):
        window = padded[t : t + n]  # oldest first
        h = wrap64(sum(w * prime**j for j, w in enumerate(window)))
        out.append(h % buckets)  # Python's % is the non-negative remainder
    return out


def test_tokenizer_round_trip_and_specials():
    ids = tokenizer.encode("hé")
    assert ids == [tokenizer.BOS_ID, ord("h") + 4, 0xC3 + 4, 0xA9 + 4]
    assert tokenizer.decode(ids + [tokenizer.EOS_ID]) == "hé".encode()
    assert tokenizer.encode(b"", add_bos=True) == [tokenizer.BOS_ID]
    assert tokenizer.VOCAB_SIZE == 260


def test_hash_ids_match_hand_computation_with_overflow():
    ids = tokenizer.encode(b"Hello, hash!")
    for n in (1, 3, 5, 8):
        for prime in (HASH_PRIMES[0], HASH_PRIMES[1], HASH_PRIMES[6]):
            got = ngram_hash_ids(torch.tensor([ids]), n, prime, 500002)[0].tolist()
            assert got == hand_hash(ids, n, prime, 500002), (n, prime)


def test_overflow_really_happens_in_the_hand_check():
    # guard: the test above is only meaningful if some windows overflow int64
    assert HASH_PRIMES[1] ** 2 * 255 > 2**63


def test_hash_tables_are_ordered_function_major():
    ids = torch.tensor([tokenizer.encode(b"abcdef")])
    tables = hash_table_ids(ids, (3, 4), 2, 97)
    assert len(tables) == 4
    assert tables[1].tolist() == ngram_hash_ids(ids, 4, HASH_PRIMES[0], 97).tolist()
    assert tables[2].tolist() == ngram_hash_ids(ids, 3, HASH_PRIMES[1], 97).tolist()


def test_hash_of_suffix_window_matches_full_sequence():
    # incremental decoding hashes only the last positions with enough left context
    ids = torch.tensor([tokenizer.encode(b"incremental hashing works")])
    full = ngram_hash_ids(ids, 6, HASH_PRIMES[0], 1009)
    tail = ngram_hash_ids(ids[:, 10:], 6, HASH_PRIMES[0], 1009)
    assert full[:, 15:].tolist() == tail[:, 5:].tolist()
