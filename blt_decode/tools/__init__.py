"""Tools around decoding: benchmarks, jobs, trace rendering, the strategy scaffold, prompt sets, corpora."""
