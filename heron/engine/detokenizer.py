"""Incremental detokenization with stop strings, for streaming output.

Two layers:

1. **Token ids -> text** (vLLM's offset scheme). Decoding each token alone is wrong:
   SentencePiece decoders turn a leading "▁" into a space only in context (and strip it
   at the start of a sequence), and byte-level tokens may hold a fraction of a UTF-8
   character. So we keep a small window ``ids[prefix:]``: ``ids[prefix:read]`` are the
   last tokens already turned into text (context), ``ids[read:]`` the new ones. The delta
   is ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``. If the result ends in
   U+FFFD (a multi-byte character split across tokens), nothing is emitted and the window
   grows until the character is complete. The window starts with the last few prompt
   tokens, so the first output token gets the right leading space. Work per call is
   O(window) = O(new tokens), never a re-decode of the whole output.

2. **Stop strings.** Decoded text that has not been returned yet is buffered. A stop string
   is searched only where it could newly appear (ending inside the new text), and the
   longest buffer suffix that is a proper prefix of some stop string is held back, so a
   stop string is never split over chunks nor partly shown to a streaming client.
"""

from __future__ import annotations

from typing import Any

from heron.sampling_params import SamplingParams

# Prompt tokens used as decoding context for the first output tokens (vLLM: 5).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas, applying its stop strings.

    Usage per engine step: ``delta = detok.add_tokens(new_ids)``; when the request ends
    for another reason (EOS, max_tokens, abort) call ``finish()`` for the held-back tail.
    After ``stopped`` becomes True (a stop string matched) nothing more is emitted; the
    engine should finish the request with ``stop_reason``.

    Attributes:
        output_text: all text returned so far (the concatenation of the deltas).
        stopped: a stop string was found.
        stop_reason: the stop string that matched, else None.
        num_output_tokens: output tokens received (including a terminating one).
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        # Decoding window (see module docstring); only the tail of the prompt is kept.
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

        self._stops: list[str] = list(params.stop or [])
        self._held = ""  # decoded but not yet returned (possible start of a stop string)
        self.output_text = ""
        self.stopped = False
        self.stop_reason: str | None = None
        self.num_output_tokens = 0
        self._finished = False

    # ------------------------------------------------------------------ public API
    def add_tokens(self, new_token_ids: list[int], stop_terminated: bool = False) -> str:
        """Feed newly generated tokens; returns the new text to show (may be "").

        ``stop_terminated=True`` says the last token ended the request (EOS or a stop
        token id): like vLLM, that token is not detokenized, and everything held back is
        flushed as with :meth:`finish`.
        """
        if self.stopped or self._finished:
            return ""
        ids = list(new_token_ids)
        self.num_output_tokens += len(ids)
        if stop_terminated and ids:
            ids.pop()
        if ids:
            self._ids.extend(ids)
        new_text = self._decode_window(force=stop_terminated) if ids or stop_terminated else ""
        delta = self._emit(new_text, final=stop_terminated)
        if stop_terminated:
            self._finished = True
        return delta

    def finish(self) -> str:
        """Flush at the end of the request: incomplete characters and held-back text.

        Held text can no longer grow into a stop string, so it is released; a trailing
        incomplete UTF-8 sequence is emitted as the tokenizer decodes it (U+FFFD).
        Idempotent: later calls return "".
        """
        if self.stopped or self._finished:
            return ""
        self._finished = True
        return self._emit(self._decode_window(force=True), final=True)

    @property
    def finished(self) -> bool:
        """No more text will be produced (stop string hit or finish() called)."""
        return self.stopped or self._finished

    # ------------------------------------------------------------------ token -> text
    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        # why no clean-up: clean_up_tokenization_spaces edits text around punctuation
        # depending on what follows, which breaks "concatenated deltas == full decode".
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_window(self, force: bool) -> str:
        """Text of the tokens in ``ids[read:]``; "" while a character is incomplete."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text):
            # Tokens that decode to nothing (skipped special tokens): keep them in the
            # window, they may still be context for what follows.
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not force:
            return ""  # split multi-byte character: wait for its remaining bytes
        delta = full_text[len(prefix_text) :]
        # The decoded tokens become the context for the next step; drop older ones so
        # the window stays O(new tokens).
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return delta

    # ------------------------------------------------------------------ stop strings
    def _emit(self, new_text: str, final: bool) -> str:
        """Add decoded text to the buffer, apply stop strings, return what may be shown."""
        buf = self._held + new_text
        if self._stops and new_text and self.num_output_tokens > self.params.min_tokens:
            # (vLLM also ignores stop strings until more than min_tokens tokens exist.)
            match = self._find_stop(buf, len(self._held))
            if match is not None:
                pos, stop = match
                end = pos + len(stop) if self.params.include_stop_str_in_output else pos
                self.stopped = True
                self.stop_reason = stop
                self._held = ""
                delta = buf[:end]
                self.output_text += delta
                return delta
        hold = 0 if final else self._stop_prefix_len(buf)
        delta, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.output_text += delta
        return delta

    def _find_stop(self, buf: str, old_len: int) -> tuple[int, str] | None:
        """Earliest stop string in ``buf`` that ends after ``old_len`` (i.e. is new).

        Earlier matches were found in previous calls; everything before a possible match
        is in ``buf`` because any suffix that starts a stop string is held back.
        Ties on the start position go to the shorter stop string.
        """
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = buf.find(stop, max(0, old_len - len(stop) + 1))
            if pos < 0:
                continue
            if best is None or pos < best[0] or (pos == best[0] and len(stop) < len(best[1])):
                best = (pos, stop)
        return best

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:k]):
                    longest = k
                    break
        return longest
