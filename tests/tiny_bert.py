"""A tiny random BERT saved as a local Hugging Face directory (config, weights, WordPiece vocab), so the
Hugging Face paths run in seconds without the 90 MB MiniLM."""
from __future__ import annotations

import string
from pathlib import Path


def make_tiny_bert(where: Path, layers: int = 4, hidden: int = 32, heads: int = 4, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    where = Path(where)
    if (where / "config.json").is_file():
        return where
    where.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (where / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(where / "vocab.txt")).save_pretrained(where)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(where)
    return where
