"""Trace events against the output and statistics they describe."""

import attrs

import blt_decode as bd
from blt_decode import trace as T
from blt_decode.checkpoints.resolve import with_config
from blt_decode.model import tokenizer


def test_trace_events_agree_with_output_and_stats():
    g = bd.generate("random:tiny:1", "trace me", strategy="blt-s", k=4, max_new_bytes=30, trace=True)
    committed = [i for e in g.trace.of_type(T.Committed) for i in e.ids]
    assert tokenizer.decode(committed) == g.output
    patches = g.trace.patches()
    assert len(patches) == g.stats.patches
    assert all(a.end == b.start for a, b in zip(patches, patches[1:]))
    # every patch that closed had its global pass, those a rejection rolled back included
    assert sum(e.count for e in g.trace.of_type(T.GlobalPass)) == len(g.trace.of_type(T.PatchClosed))
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


def test_patches_a_rejected_draft_closed_are_rolled_back_in_the_trace(wrong_draft_backend):
    """Every byte starts a patch (threshold 0) and every draft is wrong, so each verification closes
    patches past the byte it keeps: the trace says so (RolledBack) and ``patches()`` are the final ones."""
    base = bd.random_model("tiny", 1)
    model = with_config(base, attrs.evolve(base.config, patching_threshold=0.0))
    g = bd.generate(model, "roll back", strategy="blt-s", k=3, max_new_bytes=12, trace=True, backend=wrong_draft_backend)
    assert g.output == bd.generate(model, "roll back", max_new_bytes=12).output
    closed, patches = g.trace.of_type(T.PatchClosed), g.trace.patches()
    assert g.trace.of_type(T.RolledBack) and len(closed) > len(patches) == g.stats.patches
    assert [p.start for p in patches] == list(range(len(patches)))  # one byte per patch, contiguous
    assert sum(e.count for e in g.trace.of_type(T.GlobalPass)) == len(closed)
