"""The decoding contract: strategies, sessions and their primitives, options, sampling, stops, statistics."""
