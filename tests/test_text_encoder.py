"""TextEncoder: tiny build determinism, padding mask, tokenizer round trip, save/load."""
import pytest
import torch

from models.text_encoder import TextEncoder

KW = dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_length=16)


@pytest.fixture(scope="module")
def enc():
    return TextEncoder.tiny(**KW, seed=0)


def test_deterministic_across_builds(enc):
    other = TextEncoder.tiny(**KW, seed=0)
    assert other.identity() == enc.identity()
    texts = ["a red square", "ocean waves at dusk"]
    assert torch.equal(enc.encode(texts)[0], other.encode(texts)[0])
    assert TextEncoder.tiny(**KW, seed=1).identity()["weights_sha256"] != enc.identity()["weights_sha256"]
    ident = enc.identity()
    assert ident["config"]["d_model"] == 32 and ident["config"]["max_length"] == 16 and ident["pretrained"] == ""


def test_padding_mask_and_features(enc):
    feats, mask = enc.encode(["abc", "", "x" * 40])
    assert feats.shape == (3, 16, 32) and feats.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 1, 16]          # bytes + </s>, truncated to max_length
    assert mask[0, :4].all() and not mask[0, 4:].any()
    assert (feats[0, 4:] == 0).all() and (feats[0, :4].abs().sum(-1) > 0).all()
    single, _ = enc.encode(["abc"])
    torch.testing.assert_close(single[0], feats[0], rtol=0, atol=1e-5)
    ids = enc.tokenizer("héllo wörld")["input_ids"]
    assert enc.tokenizer.decode(ids, skip_special_tokens=True) == "héllo wörld"
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode("abc")


def test_save_load_round_trip(enc, tmp_path):
    enc.save(tmp_path / "te")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "te").iterdir()}
    back = TextEncoder.load(tmp_path / "te")
    assert back.max_length == 16 and back.identity() == enc.identity()
    texts = ["a calm landscape", ""]
    a, b = enc.encode(texts), back.encode(texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    pre = TextEncoder.from_pretrained(tmp_path / "te", max_length=8)
    assert pre.identity()["pretrained"] == str(tmp_path / "te") and pre.encode(["abc"])[0].shape == (1, 8, 32)
