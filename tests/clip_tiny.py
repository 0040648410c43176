"""Tiny randomly initialised transformers models saved to local directories, for the tests of the
metrics that load them offline (their scores mean nothing)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_clip(root: Path) -> Path:
    """A CLIPModel and CLIPProcessor (byte-level vocabulary, 32 px images) saved to ``root``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root.mkdir(parents=True)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5 takes vocab= and merges= (4's vocab_file= is ignored there: every caption
    # would become the same unknown tokens)
    tok = CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(small, vocab_size=len(vocab), bos_token_id=bos, eos_token_id=eos,
                                      pad_token_id=eos),
                     vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root)
    proc.save_pretrained(root)
    return root


def tiny_bert(root: Path) -> Path:
    """A saved BERT (config and weights): a transformers directory that is not CLIP."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    BertModel(cfg).save_pretrained(root)
    return root
