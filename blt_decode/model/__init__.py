"""The model: configs and presets, bytes to ids, hash n-grams, patching, layers, the KV cache, the BLT."""
