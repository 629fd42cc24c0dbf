"""Core, in folders by kind: codebooks/ (the hook point and what acts on it), training/, storage/, search/."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
