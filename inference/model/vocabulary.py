"""The built-in model's closed vocabulary, built with `tokenizers`.

Closed on purpose: the model may only say what it was trained to say (the UniBiomed answer forms and the
finding labels below); a word outside the list in a question becomes [UNK] rather than a guess.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers

PAD, BOS, EOS, UNK, SEG, IMAGE = "[PAD]", "[BOS]", "[EOS]", "[UNK]", "[SEG]", "<image>"
SPECIAL = [PAD, BOS, EOS, UNK, SEG, IMAGE]
QUESTION_WORDS = (
    "Can you identify any abnormality within this CT MRI image ? Please respond with segmentation masks . "
    "segment in the"
).split()
ANSWER_WORDS = "It is No findings Sure , .".split()
FINDING_WORDS = (
    "Brain Liver Kidney Lung Tumor tumor Nodule nodule Lesion lesion Cyst cyst Metastasis metastasis Mass mass "
    "brain liver kidney lung left right"
).split()


def build_tokenizer() -> Tokenizer:
    """Deterministic: the same vocabulary, in the same order, every time."""
    words: list[str] = []
    for word in SPECIAL + QUESTION_WORDS + ANSWER_WORDS + FINDING_WORDS:
        if word not in words:
            words.append(word)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(SPECIAL)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # "[SEG]" would be split by the punctuation pre-tokenizer without the special-token registration above.
    return tokenizer.encode(text).ids


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Tokens back to the UniBiomed answer text ("It is [SEG]. Liver tumor.")."""
    words = [tokenizer.id_to_token(i) for i in ids]
    words = [w for w in words if w not in (PAD, BOS, EOS)]
    return " ".join(words).replace(" .", ".").replace(" ,", ",").replace(" ?", "?")
