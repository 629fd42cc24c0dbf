"""Task helpers: data loading, tokenization and batching for training and analysing codebook models."""
