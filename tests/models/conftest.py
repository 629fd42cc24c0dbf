"""Fixtures of the bring-your-own-model tests: tiny Hugging Face folders and a network guard."""

from __future__ import annotations

import socket

import pytest
from _hf_tiny import make_hf_model, make_tokenizer


@pytest.fixture
def hf_folder(tmp_path):
    """`hf_folder(arch)`: a tiny model of `arch` and the tokenizer saved together; returns (folder, model)."""

    def save(arch: str, seed: int = 0, name: str = None):
        model = make_hf_model(arch, seed)
        # A folder name with words TransformerLens reads as model families: from_hf must not be misled by it.
        folder = tmp_path / (name or f"gemma-llama-{arch}")
        model.save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        return folder, model

    return save


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a host fails the test; the Hugging Face libraries are offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread is faster, and leaves the other cores alone."""
