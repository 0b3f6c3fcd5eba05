"""Built-in compute backends, one module each (installed as ``blt_decode.backends``)."""
