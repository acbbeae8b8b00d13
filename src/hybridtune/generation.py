"""Text generation for `serve`: chat prompts, batched `generate`, streaming, stop strings.

transformers does the work: `apply_chat_template` builds a chat prompt (a plain "role: content" join
when the tokenizer has no template), `generate` decodes (greedy at temperature 0, else sampling with
temperature / top-p; `stop_strings` ends a sequence at a stop string) and `TextIteratorStreamer`
streams text as it is decoded. What is left here: left padding so that a batch of prompts of
different lengths generates together, cutting the text at a stop string (OpenAI leaves the stop
string out, transformers keeps it), holding back streamed text that might be the start of a stop
string, and ending a stream's generation when its client goes away.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from hybridtune.inference import to_device


@dataclass(frozen=True)
class Sampling:
    """How to decode; requests with equal Sampling can share one `generate` call."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def kwargs(self, tokenizer) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
        if self.temperature > 0:
            kw |= {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        else:  # None: greedy, whatever sampling defaults the model's generation_config carries
            kw |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.stop:
            kw |= {"stop_strings": list(self.stop), "tokenizer": tokenizer}
        return kw


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # OpenAI's words: "stop" (end of sequence / stop string) or "length"


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt for a conversation: the tokenizer's chat template, else one "role: content" line each."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether there was one."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _until_eos(model, row: list[int]) -> tuple[list[int], bool]:
    """The generated ids up to and including the first end-of-sequence token, and whether there was one
    (a finished sequence in a batch is padded after it)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    end = next((j for j, t in enumerate(row) if t in eos), None)
    return (row, False) if end is None else (row[: end + 1], True)


def _completion(
    text: str, stopped: bool, ids: list[int], ended: bool, prompt_tokens: int, sampling
) -> Completion:
    done = stopped or ended or len(ids) < sampling.max_new_tokens  # else it ran out of max_new_tokens
    return Completion(text, prompt_tokens, len(ids), "stop" if done else "length")


def _encode(model, tokenizer, prompts: list[str]) -> dict:
    # decoders continue from the last position: pad on the left so every prompt ends there
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return to_device(dict(enc), next(model.parameters()).device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: Sampling) -> list[Completion]:
    """One `generate` call for a batch of prompts."""
    enc = _encode(model, tokenizer, prompts)
    out = model.generate(**enc, **sampling.kwargs(tokenizer))
    results = []
    for i, row in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
        ids, ended = _until_eos(model, row)
        text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)
        prompt_tokens = int(enc["attention_mask"][i].sum())
        results.append(_completion(text, stopped, ids, ended, prompt_tokens, sampling))
    return results


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


@dataclass
class Stream:
    """A streamed generation: iterate for text pieces (blocking); `result` is complete afterwards.
    Setting `cancel` (the client went away) ends the generation at the next token.

    Iterating runs the generation in a thread of its own. A server that bounds its model calls runs
    `work` where it runs them (serve's batcher, as a `Job`) and iterates `pieces()` instead;
    `timeout` then bounds the wait for each piece (queue.Empty when it passes)."""

    model: object
    tokenizer: object
    prompt: str
    sampling: Sampling
    timeout: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    result: Completion = field(default_factory=Completion)

    def __post_init__(self) -> None:
        self.streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=self.timeout
        )
        self.done = threading.Event()  # work() returned: its ids or its error are in _outputs
        self._outputs: dict = {}

    def work(self) -> None:
        """The generation itself (blocking); an error is re-raised to the consumer by pieces()."""
        try:
            if self.cancel.is_set():  # given up before it started (a timeout, a client gone)
                return
            enc = _encode(self.model, self.tokenizer, [self.prompt])
            self._outputs["prompt_tokens"] = int(enc["input_ids"].shape[1])
            with torch.no_grad():
                ids = self.model.generate(
                    **enc,
                    **self.sampling.kwargs(self.tokenizer),
                    streamer=self.streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(self.cancel)]),
                )
            self._outputs["ids"] = ids[0, enc["input_ids"].shape[1] :].tolist()
        except BaseException as e:  # re-raised in the consumer; end() unblocks it
            self._outputs["error"] = e
        finally:
            self.streamer.end()
            self.done.set()

    def __iter__(self) -> Iterator[str]:
        thread = threading.Thread(target=self.work, daemon=True)
        thread.start()
        try:
            yield from self.pieces()
        finally:  # done, stopped, or the consumer went away: end the generation either way
            self.cancel.set()
            thread.join()

    def pieces(self) -> Iterator[str]:
        """The text as it is decoded, holding back what may be the start of a stop string."""
        sampling = self.sampling
        hold = max((len(s) for s in sampling.stop), default=1) - 1
        text, sent, stopped = "", 0, False
        try:
            for piece in self.streamer:
                text += piece
                cut, stopped = cut_at_stop(text, sampling.stop)
                if stopped:
                    text = cut
                    break
                if len(text) - hold > sent:
                    yield text[sent : len(text) - hold]
                    sent = len(text) - hold
            if len(text) > sent:
                yield text[sent:]
        finally:
            self.cancel.set()  # a stop string, or the consumer went away: generation ends at the next token
        self.done.wait()  # it has started (a piece came, or its end): it ends within a token
        if "error" in self._outputs:
            raise self._outputs["error"]
        if "ids" not in self._outputs:
            raise RuntimeError("the generation was cancelled before it started")
        ids, ended = _until_eos(self.model, self._outputs["ids"])
        self.result = _completion(text, stopped, ids, ended, self._outputs["prompt_tokens"], sampling)
