"""Vocabularies: subword (BPE, via Hugging Face ``tokenizers``) and character level.

Both kinds share one interface (``BaseVocab``) and the same four special tokens, which the
vocabulary owns: ``<pad>`` (always id 0), ``<unk>``, ``<bos>`` and ``<eos>``. Callers ask for
``vocab.pad_id`` and friends and never write the numbers themselves. ``encode`` adds no
``<bos>``/``<eos>``; the training and decoding code adds them where the model needs them.
``decode`` stops at the first ``<eos>`` and leaves every special token out of the text.

``Vocab`` is a SentencePiece-style BPE: NFKC normalisation, whitespace collapsed to single
spaces, spaces kept as the ``▁`` marker (Metaspace), punctuation split into its own tokens,
and byte fallback (the 256 ``<0xNN>`` tokens) so that no character is ever unknown. Decoding
therefore gives back the normalised input exactly, accents, quotes and emoji included.
Special tokens are not matched in input text: encoding the string "<eos>" yields ordinary
subwords, so a sentence can never smuggle in a control token.

Vocabularies serialise to JSON with a ``"kind"`` field; ``vocab_from_json`` and
``load_vocab`` rebuild the right class from it.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from ..store.files import write_text_atomic

__all__ = [
    "PAD",
    "UNK",
    "BOS",
    "EOS",
    "SPECIAL_TOKENS",
    "BaseVocab",
    "Vocab",
    "CharVocab",
    "vocab_from_json",
    "load_vocab",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # in id order: <pad> is 0

_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

V = TypeVar("V", bound="BaseVocab")


class BaseVocab(ABC):
    """What every attnlab vocabulary offers: special ids, encode/decode, JSON round trips."""

    kind: ClassVar[str]

    @abstractmethod
    def __len__(self) -> int:
        """Number of token ids, special tokens included."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None if the vocabulary lacks it."""

    @abstractmethod
    def _id_to_token(self, i: int) -> str:
        """Token string of an id already known to be in range."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without ``<bos>``/``<eos>``."""

    @abstractmethod
    def tokens(self, text: str) -> list[str]:
        """Token strings of a text, one per id of ``encode(text)`` (e.g. for plot labels)."""

    @abstractmethod
    def _decode_content(self, ids: list[int]) -> str:
        """Text of ids that contain no special tokens."""

    @abstractmethod
    def _to_dict(self) -> dict[str, Any]:
        """JSON-ready description of this vocabulary, without the ``kind`` field."""

    @classmethod
    @abstractmethod
    def _from_dict(cls: type[V], data: dict[str, Any]) -> V:
        """Rebuild a vocabulary from ``_to_dict``'s output."""

    def _special_id(self, token: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise ValueError(f"{type(self).__name__} lacks the special token {token!r}")
        return i

    @property
    def pad_id(self) -> int:
        return self._special_id(PAD)

    @property
    def unk_id(self) -> int:
        return self._special_id(UNK)

    @property
    def bos_id(self) -> int:
        return self._special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self._special_id(EOS)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special_id(t) for t in SPECIAL_TOKENS)

    def _check_specials(self) -> None:
        """Reject a vocabulary whose special tokens are missing or whose ``<pad>`` is not 0."""
        if self.pad_id != 0:
            raise ValueError(f"{PAD} must have id 0, found id {self.pad_id}")
        for token in SPECIAL_TOKENS:
            self._special_id(token)

    def id_to_token(self, i: int) -> str:
        """Token string of id ``i``; ValueError if ``i`` is not a valid id."""
        if not 0 <= i < len(self):
            raise ValueError(f"token id {i} out of range for a vocabulary of size {len(self)}")
        return self._id_to_token(i)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of every text."""
        return [self.encode(t) for t in texts]

    def _content_rules(self) -> tuple[frozenset[int], int, int]:
        """What ``_content_ids`` goes by: the special ids, ``<eos>``'s id and the size (found once a batch)."""
        return self.special_ids, self.eos_id, len(self)

    def _content_ids(self, ids: Iterable[int], rules: tuple[frozenset[int], int, int] | None = None) -> list[int]:
        """The ids up to the first ``<eos>``, without special tokens; checks each id's range."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        special, eos, size = rules or self._content_rules()
        content: list[int] = []
        for i in ids:
            if not 0 <= i < size:
                raise ValueError(f"token id {i} out of range for a vocabulary of size {size}")
            if i == eos:
                break
            if i not in special:
                content.append(i)
        return content

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token-id sequence, stopping at the first ``<eos>`` and skipping specials."""
        return self._decode_content(self._content_ids(ids))

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """``decode`` of every sequence (rows of a 2-D tensor work too)."""
        rules = self._content_rules()
        return [self._decode_content(self._content_ids(ids, rules)) for ids in batch]

    def to_json(self) -> str:
        """The vocabulary as a JSON string, tagged with its ``kind``."""
        return json.dumps({"kind": self.kind, **self._to_dict()}, ensure_ascii=False)

    @classmethod
    def from_json(cls: type[V], s: str) -> V:
        """Rebuild a vocabulary from ``to_json``; its ``kind`` must fit the class asked for."""
        try:
            data = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"vocabulary JSON is not valid JSON: {e}") from None
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind not in _KINDS:
            raise ValueError(
                f"vocabulary JSON has kind {kind!r}; known kinds: {', '.join(sorted(_KINDS))}"
            )
        vocab_cls = _KINDS[kind]
        if not issubclass(vocab_cls, cls):
            raise ValueError(f"vocabulary JSON has kind {kind!r}, but {cls.__name__} was asked for")
        return vocab_cls._from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_json()`` to ``path`` atomically (temp file in the same folder, renamed)."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls: type[V], path: str | os.PathLike[str]) -> V:
        """Read a vocabulary written by ``save``; errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read vocabulary ({e})") from e
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BaseVocab):
            return NotImplemented
        return type(self) is type(other) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # equal by content, so not hashable by identity


class Vocab(BaseVocab):
    """Subword vocabulary: a byte-fallback BPE ``tokenizers.Tokenizer`` with attnlab's specials."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._check_specials()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Vocab:
        """Learn a BPE vocabulary of ``vocab_size`` ids (specials and 256 byte tokens included).

        Pairs seen fewer than ``min_frequency`` times are never merged. Every character of the
        training text gets its own id, so a tiny ``vocab_size`` on a text with a large alphabet
        can yield a somewhat larger vocabulary.
        """
        reserved = len(SPECIAL_TOKENS) + len(_BYTE_TOKENS)
        if vocab_size <= reserved:
            raise ValueError(
                f"vocab_size must exceed {reserved} (4 special tokens + 256 byte tokens), "
                f"got {vocab_size}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
        tokenizer = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated")]
        )
        tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(_BYTE_TOKENS),
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(_with_byte_tokens_and_plain_specials(tokenizer))

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def _id_to_token(self, i: int) -> str:
        return self.tokenizer.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of every text, through the tokenizer's parallel batch API."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def tokens(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def _decode_content(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """``decode`` of every sequence, through the tokenizer's batch API."""
        rules = self._content_rules()
        contents = [self._content_ids(ids, rules) for ids in batch]
        return self.tokenizer.decode_batch(contents, skip_special_tokens=False)

    def _to_dict(self) -> dict[str, Any]:
        return {"tokenizer": json.loads(self.tokenizer.to_str())}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> Vocab:
        if "tokenizer" not in data:
            raise ValueError("bpe vocabulary JSON lacks its 'tokenizer' field")
        try:
            tokenizer = Tokenizer.from_str(json.dumps(data["tokenizer"]))
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"bpe vocabulary JSON holds an invalid tokenizer: {e}") from None
        return cls(tokenizer)

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"


def _with_byte_tokens_and_plain_specials(tokenizer: Tokenizer) -> Tokenizer:
    """Add the 256 byte-fallback tokens to a trained BPE and unregister the added tokens.

    ``BpeTrainer`` does not create the ``<0xNN>`` tokens that byte fallback needs, so they are
    appended to the model's vocabulary here. The special tokens stay in the model's vocabulary
    (ids 0-3) but are dropped from the "added tokens", so that text such as "<eos>" is encoded
    as ordinary characters instead of being matched as a control token.
    """
    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for token in _BYTE_TOKENS:
        if token not in vocab:
            vocab[token] = len(vocab)
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


class CharVocab(BaseVocab):
    """Character-level vocabulary: the specials, then one id per character of a text."""

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        for c in chars:
            if len(c) != 1:
                raise ValueError(f"CharVocab entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab characters must be unique")
        self.chars = chars
        self._itos = [*SPECIAL_TOKENS, *chars]
        self._stoi = {c: i for i, c in enumerate(chars, start=len(SPECIAL_TOKENS))}
        self._check_specials()

    @classmethod
    def build(cls, text: str) -> CharVocab:
        """The vocabulary of the distinct characters of ``text``, in code-point order."""
        if not text:
            raise ValueError("cannot build a CharVocab from an empty text")
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self._itos)

    def token_to_id(self, token: str) -> int | None:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        return self._stoi.get(token)

    def _id_to_token(self, i: int) -> str:
        return self._itos[i]

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        return [self._stoi.get(c, unk) for c in text]

    def tokens(self, text: str) -> list[str]:
        return [c if c in self._stoi else UNK for c in text]

    def _decode_content(self, ids: list[int]) -> str:
        return "".join(self._itos[i] for i in ids)

    def _to_dict(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> CharVocab:
        if not isinstance(data.get("chars"), list):
            raise ValueError("char vocabulary JSON lacks its 'chars' list")
        return cls(data["chars"])

    def __repr__(self) -> str:
        return f"CharVocab(size={len(self)})"


_KINDS: dict[str, type[BaseVocab]] = {Vocab.kind: Vocab, CharVocab.kind: CharVocab}


def vocabs_to_dict(src: BaseVocab, tgt: BaseVocab) -> dict[str, Any]:
    """A model's vocabularies as stored in a checkpoint's vocab.json: "tgt" only when not shared."""
    data = {"src": json.loads(src.to_json())}
    if tgt is not src:
        data["tgt"] = json.loads(tgt.to_json())
    return data


def vocabs_from_dict(data: dict[str, Any]) -> tuple[BaseVocab, BaseVocab]:
    """(source, target) vocabularies from ``vocabs_to_dict``'s form; one object when shared."""
    src = vocab_from_json(json.dumps(data["src"]))
    return src, (src if "tgt" not in data else vocab_from_json(json.dumps(data["tgt"])))


def vocab_from_json(s: str) -> BaseVocab:
    """Rebuild whichever vocabulary ``s`` describes (by its ``kind`` field)."""
    return BaseVocab.from_json(s)


def load_vocab(path: str | os.PathLike[str]) -> BaseVocab:
    """Read whichever vocabulary the file at ``path`` holds."""
    return BaseVocab.load(path)


class SentencePieceVocab(BaseVocab):
    """Subword vocabulary learned by SentencePiece (unigram language model, or BPE).

    The model keeps attnlab's four specials at ids 0-3 as control symbols, so text such as
    "<eos>" is encoded as ordinary pieces; byte fallback means no character is ever unknown, and
    NFKC normalisation with whitespace collapsed matches ``Vocab``. SentencePiece is an optional
    dependency (``pip install sentencepiece``), imported only when such a vocabulary is used.
    The JSON form holds the serialised model proto in base64.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        spm = _import_sentencepiece()
        self.model_proto = bytes(model_proto)
        self.processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self._check_specials()

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, *, model_type: str = "unigram", seed: int = 0,
        threads: int = 2,
    ) -> SentencePieceVocab:
        """Learn a SentencePiece model of ``vocab_size`` ids (specials and byte pieces included).

        Every text of ``texts`` is used (sample beforehand for a large corpus); ``seed`` fixes
        SentencePiece's own random choices so that the same texts give the same model.
        """
        spm = _import_sentencepiece()
        import io

        reserved = len(SPECIAL_TOKENS) + len(_BYTE_TOKENS)
        if vocab_size <= reserved:
            raise ValueError(
                f"vocab_size must exceed {reserved} (4 special tokens + 256 byte pieces), got {vocab_size}"
            )
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        spm.set_random_generator_seed(seed)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="nfkc", remove_extra_whitespaces=True,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            hard_vocab_limit=False, num_threads=threads, max_sentence_length=1 << 16,
            input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
        return cls(model.getvalue())

    def __len__(self) -> int:
        return self.processor.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.processor.piece_to_id(token)
        if i == self.processor.unk_id() and token != UNK:
            return None
        return i

    def _id_to_token(self, i: int) -> str:
        return self.processor.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of every text, on SentencePiece's own threads (every core)."""
        return self.processor.encode(list(texts), out_type=int)

    def tokens(self, text: str) -> list[str]:
        return self.processor.encode(text, out_type=str)

    def _decode_content(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def _to_dict(self) -> dict[str, Any]:
        import base64

        return {"model": base64.b64encode(self.model_proto).decode("ascii")}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> SentencePieceVocab:
        import base64
        import binascii

        if not isinstance(data.get("model"), str):
            raise ValueError("sentencepiece vocabulary JSON lacks its 'model' field")
        try:
            proto = base64.b64decode(data["model"], validate=True)
        except binascii.Error as e:
            raise ValueError(f"sentencepiece vocabulary JSON holds invalid base64: {e}") from None
        try:
            return cls(proto)
        except RuntimeError as e:  # SentencePiece's error for a broken model proto
            raise ValueError(f"sentencepiece vocabulary JSON holds an invalid model: {e}") from None

    def __repr__(self) -> str:
        return f"SentencePieceVocab(size={len(self)})"


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError(
            "the sentencepiece tokenizer needs the sentencepiece package: pip install sentencepiece"
        ) from None
    return sentencepiece


_KINDS[SentencePieceVocab.kind] = SentencePieceVocab
__all__ += ["SentencePieceVocab"]
