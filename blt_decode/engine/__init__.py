"""Running requests: the request record, the strategy driver and the batched engine."""
