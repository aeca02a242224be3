"""The model: tokenize, forward, post-process; sparse heads, Matryoshka, fingerprint."""
