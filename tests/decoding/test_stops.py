"""Stop sequences: the matcher agrees with the definition on every prefix of every output, its work grows
with the output and not with the stop list, and a request may not ask for an unbounded stop list."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import blt_decode as bd
from blt_decode.decoding.stops import StopMatcher
from blt_decode.engine.request import MAX_STOP_BYTES, MAX_STOP_SEQUENCES, Request, prepare
from blt_decode.errors import InvalidRequestError
from blt_decode.serving.bridge import ChoiceText

SMALL = st.binary(min_size=1, max_size=6).map(lambda b: bytes(x % 3 for x in b))  # few letters: many matches


@given(stops=st.lists(SMALL, min_size=0, max_size=5), data=st.binary(max_size=60).map(lambda b: bytes(x % 3 for x in b)),
       cuts=st.lists(st.integers(0, 60), max_size=8))
def test_the_matcher_agrees_with_the_definition_after_every_chunk(stops, data, cuts):
    matcher = StopMatcher(stops)
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        matcher.feed(data[a:b])
        seen = data[:b]
        assert matcher.ended == max((len(s) for s in stops if seen.endswith(s)), default=0)
        assert matcher.pending == max((n for s in stops for n in range(1, len(s) + 1) if seen.endswith(s[:n])), default=0)


def _feed_bytewise(stops, output):
    text = ChoiceText(stops)
    start = time.perf_counter()
    for i in range(len(output)):
        text.feed(output[i:i + 1])
    return time.perf_counter() - start


def test_stop_matching_costs_the_output_not_the_stop_list():
    """The largest stop list allowed, none of it ever matching past its first byte (the old matcher's
    worst case: every prefix of every stop checked after each chunk), against one short stop. The old
    matcher took 7.5 s here (the short stop: 0.01 s) on a shared 2-core machine; this one takes about as
    long for both, and the bounds leave a loaded machine a wide margin."""
    output = b"a" * 8000
    worst = [bytes([97]) + bytes([98 + i % 20]) * (MAX_STOP_BYTES - 1) for i in range(MAX_STOP_SEQUENCES)]
    heavy = _feed_bytewise(worst, output)
    light = _feed_bytewise([b"ab"], output)
    assert heavy < 2.0 and heavy < 10 * light + 0.5, (heavy, light)


@pytest.mark.parametrize("stop,words", [
    (["x"] * (MAX_STOP_SEQUENCES + 1), f"at most {MAX_STOP_SEQUENCES} are allowed"),
    (["ok", "y" * (MAX_STOP_BYTES + 1)], f"stop sequence 1 is {MAX_STOP_BYTES + 1} bytes long; at most {MAX_STOP_BYTES}"),
])
def test_a_stop_list_over_the_limits_is_refused_up_front(stop, words):
    with pytest.raises(InvalidRequestError, match=words):
        prepare(Request("a", stop=stop), 512)
    with pytest.raises(InvalidRequestError, match=words):
        bd.generate("random:tiny", "a", max_new_bytes=4, stop=stop)
    prepare(Request("a", stop=stop[:MAX_STOP_SEQUENCES] if len(stop) > MAX_STOP_SEQUENCES else ["ok"]), 512)


def test_max_new_bytes_beyond_any_prompt_names_the_limit():
    with pytest.raises(InvalidRequestError, match="max_new_bytes=5000 exceeds the model's limit: at most 511 new bytes"):
        prepare(Request("", max_new_bytes=5000), 512)
