"""Built-in decoding strategies, one module each (installed as ``blt_decode.strategies``)."""
