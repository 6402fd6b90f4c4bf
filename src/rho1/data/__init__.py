"""Data: text sources, tokenizers, the TokenStore and ScoreStore, and batches of windows."""
