"""Janus special tokens, always looked up by string.

Ids differ between checkpoints (pad is 100002 in Janus-Pro-1B and 100015 in -7B), so nothing in mmr1 hard-codes
an id: `SpecialTokens.from_tokenizer` resolves them once per loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelFolderError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_PLACEHOLDER = "<image_placeholder>"
BEGIN_OF_IMAGE = "<begin_of_image>"
END_OF_IMAGE = "<end_of_image>"
USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"

# Every special token of the Janus-Pro tokenizers, in their order; the tiny builder registers the same set.
JANUS_SPECIAL_TOKENS = (
    BOS,
    EOS,
    PAD,
    IMAGE_PLACEHOLDER,
    "<patch_placeholder>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    USER_ROLE,
    ASSISTANT_ROLE,
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
)

# What JanusProcessor expects as named extra special tokens on the tokenizer.
PROCESSOR_EXTRA_SPECIAL_TOKENS = {
    "image_token": IMAGE_PLACEHOLDER,
    "boi_token": BEGIN_OF_IMAGE,
    "eoi_token": END_OF_IMAGE,
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the prompt builder and samplers need."""

    bos: int
    eos: int
    pad: int
    image_placeholder: int
    begin_of_image: int
    end_of_image: int

    @classmethod
    def from_tokenizer(cls, tokenizer, folder: str = "") -> "SpecialTokens":
        """Resolve every id by string; a tokenizer lacking one is not a Janus tokenizer."""
        vocab = tokenizer.get_vocab()
        wanted = {
            "bos": BOS,
            "eos": EOS,
            "pad": PAD,
            "image_placeholder": IMAGE_PLACEHOLDER,
            "begin_of_image": BEGIN_OF_IMAGE,
            "end_of_image": END_OF_IMAGE,
        }
        missing = [token for token in wanted.values() if token not in vocab]
        if missing:
            raise ModelFolderError(
                f"The tokenizer in {folder or 'this folder'} lacks the Janus special tokens {missing}; "
                "it is not a Janus-Pro tokenizer."
            )
        return cls(**{name: vocab[token] for name, token in wanted.items()})


def mark_control_tokens(tokenizer) -> None:
    """Flag every Janus control token the tokenizer holds as special, keeping its id and matching options.

    `MMR1Model.tokenize` spells out special tokens only, and whether a folder's files flag a token special
    differs between layouts and transformers versions (5.x keeps a role that tokenizer.json marks plain as plain,
    so "<|User|>" typed in a prompt would still become the role)."""
    from tokenizers import AddedToken

    backend = tokenizer.backend_tokenizer
    plain = [token for token in backend.get_added_tokens_decoder().values()
             if token.content in JANUS_SPECIAL_TOKENS and not token.special]
    backend.add_special_tokens([
        AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                   normalized=token.normalized, special=True)
        for token in plain
    ])


def janus_tokenizer_class():
    """The fast tokenizer class JanusProcessor accepts: any in transformers 5, LlamaTokenizerFast in 4.x.

    In 5.x LlamaTokenizerFast rebuilds its own pre-tokenizer, so the generic class keeps tokenizer.json as is.
    """
    import transformers

    if hasattr(transformers, "TokenizersBackend"):
        return transformers.PreTrainedTokenizerFast
    return transformers.LlamaTokenizerFast
