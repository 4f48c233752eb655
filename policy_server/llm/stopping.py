"""Stop strings: which one, if any, the decoded text of a completion has just reached."""

from __future__ import annotations

from typing import Protocol

BYTES_PER_CHAR = 4
"""At most four UTF-8 bytes make one character, and a byte-level token holds at least one byte."""
SLACK_TOKENS = 4
"""Extra tokens in the window for tokens that decode to nothing (a stripped leading space)."""


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ..., **kwargs: object) -> str: ...


class StopMatcher:
    """Finds the stop string a completion ends on, checking the decoded text of its last tokens.

    A stop string may span several tokens, or end inside one token's text; the sample stops right
    after the token that completes it. Called once per generated token, so only a window of the
    last ``4 * len(longest stop string) + 4`` tokens is decoded: enough tokens to hold the longest
    stop string even if every character took four byte-level tokens. Special tokens are decoded to
    their text (``<|eot_id|>``), so a special token and a multi-token spelling of it both stop.
    """

    def __init__(self, tokenizer: Decoder, stop_strings: tuple[str, ...]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(dict.fromkeys(stop_strings))
        longest = max((len(s) for s in self.stop_strings), default=0)
        self.window = BYTES_PER_CHAR * longest + SLACK_TOKENS

    def __call__(self, completion_ids: list[int]) -> str | None:
        """The stop string found in the last tokens of ``completion_ids``, or None.

        When several are present, the one whose first occurrence ends first wins (then the longest),
        so of ``"\\n"`` and ``"\\n\\n"`` completed by one token, ``"\\n"`` is reported.
        """
        if not self.stop_strings or not completion_ids:
            return None
        text = self.tokenizer.decode(
            completion_ids[-self.window :], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        found = [(text.find(s) + len(s), -len(s), s) for s in self.stop_strings if s in text]
        return min(found)[2] if found else None
