"""On-disk formats: model folders, the marker and its verifier, atomic writes, tokenizers."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
