import blt_decode as bd
from blt_decode import tokenizer
from blt_decode import trace as T


def test_trace_events_agree_with_output_and_stats():
    g = bd.generate("random:tiny:1", "trace me", strategy="blt-s", k=4, max_new_bytes=30, trace=True)
    committed = [i for e in g.trace.of_type(T.Committed) for i in e.ids]
    assert tokenizer.decode(committed) == g.output
    patches = g.trace.of_type(T.PatchClosed)
    assert len(patches) == g.stats.patches
    assert all(a.end == b.start for a, b in zip(patches, patches[1:]))
    assert sum(e.count for e in g.trace.of_type(T.GlobalPass)) == g.stats.patches
    assert len(g.trace.of_type(T.GlobalPass)) == g.stats.passes.global_
    verified = g.trace.of_type(T.Verified)
    assert len(verified) == g.stats.verify_passes
    assert sum(v.accepted - 1 for v in verified) == g.stats.accepted_bytes


def test_tracing_is_off_by_default_and_does_not_change_output():
    plain = bd.generate("random:tiny:1", "x", max_new_bytes=20)
    traced = bd.generate("random:tiny:1", "x", max_new_bytes=20, trace=True)
    assert plain.trace is None and traced.trace is not None
    assert plain.output == traced.output
