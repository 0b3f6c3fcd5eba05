import blt_decode as bd
from blt_decode import trace as T
from blt_decode.model import tokenizer


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
    # the round's draft length: k, or fewer where max_new_bytes cuts the draft; a draft ending in EOS is shorter
    assert all(len(v.drafted) - 1 <= v.k <= 4 for v in verified) and verified[0].k == 4


def test_tracing_is_off_by_default_and_does_not_change_output():
    plain = bd.generate("random:tiny:1", "x", max_new_bytes=20)
    traced = bd.generate("random:tiny:1", "x", max_new_bytes=20, trace=True)
    assert plain.trace is None and traced.trace is not None
    assert plain.output == traced.output


def test_diffusion_passes_are_traced():
    g = bd.generate("random:tiny:1", "x", strategy="blt-d", block_size=4, max_new_bytes=12, trace=True)
    unmasked = g.trace.of_type(T.Unmasked)
    assert sum(len(e.positions) for e in unmasked) >= g.stats.new_bytes
    assert all(0.0 <= c <= 1.0 for e in unmasked for c in e.confidences)
    steps_per_block = {}
    for e in unmasked:
        steps_per_block[e.block_start] = max(steps_per_block.get(e.block_start, 0), e.step)
    assert len(steps_per_block) == g.stats.blocks
