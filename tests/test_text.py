import pytest
import torch

from scalegen.errors import DataError, WeightsError
from scalegen.text.bow import BagOfWordsEncoder


def test_bow_is_deterministic_and_compositional():
    a, b = BagOfWordsEncoder(64), BagOfWordsEncoder(64)
    x = a.encode(["a large red cube", "Large RED cube"])
    assert torch.equal(x.pooled[0], x.pooled[1])  # articles, case and punctuation do not matter
    assert torch.equal(x.pooled, b.encode(["a large red cube", "large red cube"]).pooled)
    # An unseen combination is the (normalised) sum of seen words.
    words = a.encode(["large", "red", "cube"]).pooled
    assert torch.allclose(x.pooled[0], words.sum(0) / 3**0.5, atol=1e-6)
    assert x.tokens.shape == (2, 16, 64) and x.mask[0].sum() == 3
    # A prompt without an encodable word says why (never "give a non-empty prompt" of a non-empty one).
    for prompt in ("  the  ", "!!!", "\U0001f3a8\U0001f680", "\u7ea2\u8272\u7acb\u65b9\u4f53"):
        with pytest.raises(DataError, match=r"cannot be encoded: the bag-of-words encoder .*knows only words of "
                                            r"ASCII letters and digits .* and it has none") as e:
            a.encode([prompt])
        assert "non-empty" not in str(e.value)
    with pytest.raises(DataError, match="cannot be encoded: it is empty"):
        a.encode([" "])


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    from scalegen.text.clip import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_tiny_clip_loads_through_the_real_path(tiny_clip_dir):
    from scalegen.text.clip import CLIPTextEncoder

    enc = CLIPTextEncoder(str(tiny_clip_dir))
    out = enc.encode(["a red cube", "a DSLR photo of a car made out of sushi"])
    assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 77, 32)
    # The real CLIP BPE: start, 'a', 'red', 'cube', end.
    assert enc.tokenizer("a red cube").input_ids == [49406, 320, 736, 11353, 49407]
    assert enc.count_tokens("word " * 100) > enc.max_tokens == 77
    # pooled is the EOS position of the final-layer-normed states (SD's "global" embedding).
    eos = 4
    assert torch.allclose(out.pooled[0], out.tokens[0, eos], atol=1e-5)


def test_missing_weights_message(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from scalegen.text.clip import CLIPTextEncoder

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(WeightsError, match="has no tokenizer/, text_encoder/ folder"):
        CLIPTextEncoder(str(tmp_path))
    with pytest.raises(WeightsError, match="text.model='someone/x' is neither a local folder nor in the local"):
        CLIPTextEncoder("someone/x")
