"""Vocabularies: exact round trips, special ids owned by the vocabulary, JSON serialisation."""

from __future__ import annotations

import pytest
import torch

from attnlab.data.corpus import DATA_DIR, load_multi30k
from attnlab.data.vocab import (
    BOS,
    EOS,
    PAD,
    UNK,
    CharVocab,
    Vocab,
    load_vocab,
    vocab_from_json,
)

VOCAB_SIZE = 1000
SENTENCES = [
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Ein Mädchen (ca. 5 Jahre) sagt: „Grüß Gott!“ – und läuft über die Straße.",
    "A man's \"red\" hat costs $3.50; isn't that cheap?",
    "Un garçon à côté d'une fenêtre, naïf et très ému!",
    "Emoji 😀 and Ω and 東京 are not in the training text.",
]


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    pairs = load_multi30k("train", "de", "en", data_dir=DATA_DIR)[:3000]
    return Vocab.train([s for pair in pairs for s in pair], vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return (DATA_DIR / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20000]


def test_special_ids_are_distinct_and_pad_is_zero(vocab):
    ids = [vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id]
    assert vocab.pad_id == 0
    assert len(set(ids)) == 4
    assert [vocab.id_to_token(i) for i in ids] == [PAD, UNK, BOS, EOS]
    assert len(vocab) == VOCAB_SIZE


@pytest.mark.parametrize("sentence", SENTENCES)
def test_round_trip_is_exact(vocab, sentence):
    ids = vocab.encode(sentence)
    assert not set(ids) & vocab.special_ids
    assert vocab.decode(ids) == sentence


def test_frequent_words_are_single_subwords(vocab):
    assert vocab.tokens("Ein Mann mit einem Hund.") == ["▁Ein", "▁Mann", "▁mit", "▁einem", "▁Hund", "."]
    assert len(vocab.tokens(SENTENCES[1])) == len(vocab.encode(SENTENCES[1]))


def test_whitespace_is_normalised(vocab):
    assert vocab.decode(vocab.encode("  Ein   Hund\t läuft.  ")) == "Ein Hund läuft."


def test_compatibility_characters_are_nfkc_normalised(vocab):
    assert vocab.decode(vocab.encode("ﬁne…")) == "fine..."


def test_special_token_text_is_not_a_control_token(vocab):
    text = "Er schreibt <eos> und <pad> an die Tafel."
    ids = vocab.encode(text)
    assert not set(ids) & vocab.special_ids
    assert vocab.decode(ids) == text


def test_decode_stops_at_eos_and_skips_specials(vocab):
    ids = vocab.encode("Ein Hund läuft.")
    other = vocab.encode("Eine Katze")
    framed = [vocab.bos_id, *ids, vocab.eos_id, *other, vocab.pad_id]
    assert vocab.decode(framed) == "Ein Hund läuft."
    assert vocab.decode([vocab.bos_id, vocab.pad_id, *ids]) == "Ein Hund läuft."
    assert vocab.decode(torch.tensor(framed)) == "Ein Hund läuft."


def test_batch_api_matches_single_calls(vocab):
    batch = vocab.encode_batch(SENTENCES)
    assert batch == [vocab.encode(s) for s in SENTENCES]
    padded = [[vocab.bos_id, *ids, vocab.eos_id, vocab.pad_id] for ids in batch]
    assert vocab.decode_batch(padded) == SENTENCES


def test_bad_ids_are_rejected(vocab):
    with pytest.raises(ValueError, match=f"token id {VOCAB_SIZE} out of range"):
        vocab.id_to_token(VOCAB_SIZE)
    with pytest.raises(ValueError, match="token id -1 out of range"):
        vocab.decode([5, -1])


def test_training_rejects_a_size_without_room_for_subwords():
    with pytest.raises(ValueError, match="vocab_size must exceed 260"):
        Vocab.train(["ein Hund"], vocab_size=200)


def test_json_round_trip_keeps_encodings(vocab, tmp_path):
    restored = Vocab.from_json(vocab.to_json())
    assert restored == vocab
    assert restored.encode_batch(SENTENCES) == vocab.encode_batch(SENTENCES)
    assert restored.decode(vocab.encode(SENTENCES[1])) == SENTENCES[1]

    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]  # no temp file left
    loaded = load_vocab(path)
    assert isinstance(loaded, Vocab)
    assert loaded.encode(SENTENCES[0]) == vocab.encode(SENTENCES[0])


def test_training_is_deterministic(vocab):
    pairs = load_multi30k("train", "de", "en", data_dir=DATA_DIR)[:3000]
    again = Vocab.train([s for pair in pairs for s in pair], vocab_size=VOCAB_SIZE)
    assert again == vocab


def test_json_kind_must_match(vocab, tmp_path):
    with pytest.raises(ValueError, match="kind 'bpe', but CharVocab was asked for"):
        CharVocab.from_json(vocab.to_json())
    with pytest.raises(ValueError, match="kind 'words'; known kinds: bpe, char"):
        vocab_from_json('{"kind": "words"}')
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json: vocabulary JSON is not valid JSON"):
        Vocab.load(path)


def test_char_vocab_round_trip(shakespeare):
    vocab = CharVocab.build(shakespeare)
    assert vocab.pad_id == 0
    assert len({vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id}) == 4
    assert len(vocab) == 4 + len(set(shakespeare))
    passage = shakespeare[:500]
    ids = vocab.encode(passage)
    assert len(ids) == 500
    assert vocab.decode(ids) == passage
    assert vocab.tokens("First") == ["F", "i", "r", "s", "t"]
    assert vocab.decode([vocab.bos_id, *vocab.encode("Hi"), vocab.eos_id, *vocab.encode("x")]) == "Hi"


def test_char_vocab_unknown_characters(shakespeare):
    vocab = CharVocab.build(shakespeare)
    assert "é" not in shakespeare
    ids = vocab.encode("Café")
    assert ids[-1] == vocab.unk_id
    assert vocab.tokens("Café") == ["C", "a", "f", UNK]
    assert vocab.decode(ids) == "Caf"


def test_char_vocab_json_round_trip(shakespeare, tmp_path):
    vocab = CharVocab.build(shakespeare)
    restored = vocab_from_json(vocab.to_json())
    assert isinstance(restored, CharVocab)
    assert restored == vocab
    path = tmp_path / "chars.json"
    vocab.save(path)
    loaded = CharVocab.load(path)
    assert loaded.encode(shakespeare[:200]) == vocab.encode(shakespeare[:200])
    with pytest.raises(ValueError, match="kind 'char', but Vocab was asked for"):
        Vocab.load(path)
