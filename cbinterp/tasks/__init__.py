"""Task data for experiments: the shipped English corpus and its splits."""
