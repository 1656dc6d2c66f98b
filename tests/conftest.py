"""Session fixtures: tiny random checkpoints saved as real folders (builders in fixtures.py).

Each fixture returns the Path of a folder holding config.json, safetensors weights and a
tokenizer that AutoTokenizer loads. They are built once per test session, without network.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fixtures  # noqa: E402

# Hermetic run: every cache a test (or a subprocess it starts, which inherits os.environ) could
# write to points into one temporary folder, removed at the end. Set in pytest_configure, before
# the test modules are imported, because huggingface_hub and matplotlib read these at import.
# (HF_HUB_CACHE is left unset so that a test giving HF_HOME to a subprocess moves the hub cache.)
_CACHE_VARS = {"ADAPTEDIT_CACHE": "adaptedit", "XDG_CACHE_HOME": "xdg", "HF_HOME": "hf",
               "MPLCONFIGDIR": "matplotlib", "TORCH_HOME": "torch",
               "TRITON_CACHE_DIR": "triton"}
_SAVED: dict[str, str | None] = {}
_ROOT: list[Path] = []


def pytest_configure(config):
    root = Path(tempfile.mkdtemp(prefix="adaptedit-test-cache-"))
    _ROOT.append(root)
    for var, sub in _CACHE_VARS.items():
        _SAVED[var] = os.environ.get(var)
        os.environ[var] = str(root / sub)


def pytest_unconfigure(config):
    for var, old in _SAVED.items():
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
    for root in _ROOT:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def hermetic_caches():
    """The whole run's cache folders (see pytest_configure): {variable: path}. Tests that need a
    cache of their own (e.g. to count cache hits) set ADAPTEDIT_CACHE under their tmp_path."""
    paths = {var: Path(os.environ[var]) for var in _CACHE_VARS}
    assert all(_ROOT[0] in p.parents for p in paths.values())
    return paths


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
