"""ByteTokenizer: exact UTF-8 round trips, including multi-byte characters."""

import pytest
import torch

from hierseq.data import ByteTokenizer


@pytest.mark.parametrize("text", ["", "Emma Woodhouse, handsome", "naïve café — “quoted” 日本語 🙂\n\ttab"])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_non_ascii_is_several_bytes():
    ids = ByteTokenizer().encode("é🙂")
    assert ids.tolist() == [0xC3, 0xA9, 0xF0, 0x9F, 0x99, 0x82]
    assert ByteTokenizer.vocab_size == 256


def test_decode_invalid_utf8_replaces():
    # A 4-byte emoji cut after 2 bytes, as sampling may produce.
    assert ByteTokenizer().decode(torch.tensor([104, 0xF0, 0x9F])) == "h\ufffd"


def test_decode_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(torch.tensor([256]))
    with pytest.raises(ValueError, match="rank 1"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
