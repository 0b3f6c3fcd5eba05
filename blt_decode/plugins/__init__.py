"""Plugins: the hook specifications and the registry of strategies and backends."""
