"""Verifying a draft: the accept rule shared by the exact speculative strategies (BLT-S, BLT-DV)."""

from __future__ import annotations

from typing import Sequence

import torch

from blt_decode.sampling import greedy
from blt_decode.session import DecodeSession
from blt_decode.trace import Verified


def verify_draft(session: DecodeSession, draft: Sequence[int]) -> tuple[int, torch.Tensor]:
    """One verification pass over ``draft`` (whose first id is already exact) placed after the committed
    sequence: keep the longest prefix on which each drafted id equals the verified greedy choice, roll
    every cache back to it, count drafted/accepted bytes, and return (accepted length, the exact logits
    after it). Those logits' greedy byte is the corrected byte (or the free one when all matched)."""
    start = session.length
    verified = session.verify(draft)
    choices = greedy(verified).tolist()  # choices[j]: the exact greedy byte after draft[j]
    accepted = 1
    while accepted < len(draft) and choices[accepted - 1] == draft[accepted]:
        accepted += 1
    if accepted < len(draft):
        session.truncate(start + accepted)
    session.stats.add(drafted_bytes=len(draft) - 1, accepted_bytes=accepted - 1)
    session.emit(Verified(start, tuple(int(i) for i in draft), accepted))
    return accepted, verified[accepted - 1]
