"""Session fixtures: tiny random checkpoints saved as real folders (builders in fixtures.py).

Each fixture returns the Path of a folder holding config.json, safetensors weights and a
tokenizer that AutoTokenizer loads. They are built once per test session, without network.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """LlamaForCausalLM, untied lm_head, ChatML tokenizer; model.safetensors."""
    return fixtures.make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    """As tiny_llama but tie_word_embeddings=True (no lm_head.weight in the file)."""
    return fixtures.make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tied"), tied=True)


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory):
    """Same weights as tiny_llama, in >= 2 shards + model.safetensors.index.json."""
    return fixtures.make_tiny_llama_sharded(tmp_path_factory.mktemp("tiny_llama_sharded"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """GPT2LMHeadModel (Conv1D layers), ChatML tokenizer."""
    return fixtures.make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """BertModel (encoder only), WordPiece tokenizer."""
    return fixtures.make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
