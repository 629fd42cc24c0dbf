"""On-disk formats: model folders, the marker and its verifier, atomic writes, tokenizers."""
