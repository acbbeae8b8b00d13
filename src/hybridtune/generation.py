"""The one generation path of causal LMs: `hybridtune generate` (and `predict` on a causal run),
causal_lm's test-report generations, and `serve` (/v1/generate, /v1/completions,
/v1/chat/completions; batched or streamed).

The prompt format: the context a response follows, built exactly as training built it (the part of
tasks/causal_lm.encode's input ids whose labels are -100). Training picks the format from its
tokenizer (`training_format`), run.json records it (`prompt_format`, and export.json copies it), and
everything that generates from a saved run reads that record (`recorded_format`):

    chat_template  `tokenizer.apply_chat_template(turns, add_generation_prompt=True)`, tokenized
                   without adding special tokens (the template writes its own)
    plain          a tokenizer without a chat template: its BOS token (if it has one), then the
                   turns' contents joined by "\\n" and a final "\\n", no special tokens added
    None           no record (a transformers model dir, a run.json without one): the text as given,
                   tokenized with the tokenizer's own special tokens; a chat through the tokenizer's
                   template, else one "role: content" line per turn and "assistant:"

A prompt to answer (`hybridtune generate`, /v1/generate) is one user turn in that format, a chat
(/v1/chat/completions) its messages; a text to continue (/v1/completions, OpenAI's raw completion)
is tokenized as it stands by the format's special-token rule (plain: BOS first; chat_template: none
added). With a record, generation stops at the tokenizer's EOS, the token training ended every
response with; without one, at the model's generation_config EOS.

transformers does the work: `generate` decodes (greedy at temperature 0, else sampling with
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

from hybridtune.device import to_device
from hybridtune.errors import UserError

CHAT_TEMPLATE, PLAIN = "chat_template", "plain"
FORMATS = (CHAT_TEMPLATE, PLAIN)
# an encoded prompt: input_ids (and token_type_ids where a tokenizer without a record adds them)
Prompt = dict[str, list[int]]


# --------------------------------------------------------------------------------------------------
# the prompt format


def training_format(tokenizer) -> str:
    """The format training uses with this tokenizer (and run.json records)."""
    return CHAT_TEMPLATE if getattr(tokenizer, "chat_template", None) else PLAIN


def recorded_format(info: dict, where: str) -> str | None:
    """The `prompt_format` of a run.json / export.json (None: no record), checked."""
    fmt = info.get("prompt_format")
    if fmt is not None and fmt not in FORMATS:
        raise UserError(where, f"prompt_format {str(fmt)[:40]!r}", "chat_template or plain")
    return fmt


def context_ids(tokenizer, fmt: str, turns: list[dict]) -> list[int]:
    """The ids a response follows in the recorded format `fmt` (module docstring): what training's
    labels are -100 on, and what generation feeds the model."""
    if fmt == CHAT_TEMPLATE:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(t["content"] for t in turns) + "\n"
    return _bos(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """A chat for a model without a record: the tokenizer's chat template, else "role: content" lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _as_given(tokenizer, text: str) -> Prompt:
    enc = tokenizer(text)
    return {k: list(enc[k]) for k in ("input_ids", "token_type_ids") if k in enc}


def prompt_input(tokenizer, fmt: str | None, prompt: str) -> Prompt:
    """A prompt to answer: one user turn in the format (None: the text as given)."""
    if fmt is None:
        return _as_given(tokenizer, prompt)
    return {"input_ids": context_ids(tokenizer, fmt, [{"role": "user", "content": prompt}])}


def chat_input(tokenizer, fmt: str | None, messages: list[dict]) -> Prompt:
    """A conversation to continue with the assistant's turn."""
    if fmt is None:
        return _as_given(tokenizer, chat_prompt(tokenizer, messages))
    return {"input_ids": context_ids(tokenizer, fmt, messages)}


def text_input(tokenizer, fmt: str | None, text: str) -> Prompt:
    """A text to continue as it stands, with the format's special-token rule."""
    if fmt is None:
        return _as_given(tokenizer, text)
    bos = _bos(tokenizer) if fmt == PLAIN else []
    return {"input_ids": bos + tokenizer(text, add_special_tokens=False)["input_ids"]}


# --------------------------------------------------------------------------------------------------
# decoding


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


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether there was one."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _eos(model, tokenizer, fmt: str | None) -> list[int]:
    """The end-of-sequence ids: training's EOS where the format is recorded, else the model's own."""
    if fmt is not None and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    eos = getattr(model.generation_config, "eos_token_id", None)
    return eos if isinstance(eos, list) else [] if eos is None else [eos]


def _decode_kwargs(tokenizer, fmt: str | None, sampling: Sampling) -> dict:
    kw = sampling.kwargs(tokenizer)
    if fmt is not None and tokenizer.eos_token_id is not None:
        kw["eos_token_id"] = tokenizer.eos_token_id
    return kw


def _until_eos(eos: list[int], row: list[int]) -> tuple[list[int], bool]:
    """The generated ids up to and including the first end-of-sequence token, and whether there was one
    (a finished sequence in a batch is padded after it)."""
    end = next((j for j, t in enumerate(row) if t in eos), None)
    return (row, False) if end is None else (row[: end + 1], True)


def _completion(
    text: str, stopped: bool, ids: list[int], ended: bool, prompt_tokens: int, sampling
) -> Completion:
    done = stopped or ended or len(ids) < sampling.max_new_tokens  # else it ran out of max_new_tokens
    return Completion(text, prompt_tokens, len(ids), "stop" if done else "length")


def _batch(model, tokenizer, prompts: list[Prompt]) -> dict:
    # decoders continue from the last position: pad on the left so every prompt ends there
    enc = tokenizer.pad(prompts, padding=True, padding_side="left", return_tensors="pt")
    return to_device(dict(enc), next(model.parameters()).device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    sampling: Sampling,
    fmt: str | None = None,
    batch_size: int | None = None,
) -> list[Completion]:
    """transformers' `generate` on encoded prompts, `batch_size` at a time (None: all in one call)."""
    model.eval()
    eos = _eos(model, tokenizer, fmt)
    results = []
    step = batch_size or max(len(prompts), 1)
    for start in range(0, len(prompts), step):
        enc = _batch(model, tokenizer, prompts[start : start + step])
        out = model.generate(**enc, **_decode_kwargs(tokenizer, fmt, sampling))
        for i, row in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
            ids, ended = _until_eos(eos, row)
            text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)
            prompt_tokens = int(enc["attention_mask"][i].sum())
            results.append(_completion(text, stopped, ids, ended, prompt_tokens, sampling))
    return results


def answer(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    *,
    prompt_format: str | None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Answers to user prompts (`hybridtune generate`, `predict` on a causal run): greedy, or sampled
    (temperature, nucleus top_p, seeded); the text without surrounding whitespace."""
    from transformers import set_seed

    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"prompt {i + 1}", "an empty prompt", "a non-empty text")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens", str(max_new_tokens), "at least 1")
    if do_sample and not temperature > 0:
        raise UserError("--temperature", str(temperature), "a temperature > 0")
    if do_sample and not 0 < top_p <= 1:
        raise UserError("--top-p", str(top_p), "a probability in (0, 1]")
    if seed is not None:
        set_seed(seed)
    sampling = Sampling(max_new_tokens, temperature if do_sample else 0.0, top_p if do_sample else 1.0)
    inputs = [prompt_input(tokenizer, prompt_format, p) for p in prompts]
    done = generate(model, tokenizer, inputs, sampling, prompt_format, batch_size)
    return [c.text.strip() for c in done]


# --------------------------------------------------------------------------------------------------
# streaming


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
    prompt: Prompt
    sampling: Sampling
    fmt: str | None = None
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
            enc = _batch(self.model, self.tokenizer, [self.prompt])
            self._outputs["prompt_tokens"] = int(enc["input_ids"].shape[1])
            with torch.no_grad():
                ids = self.model.generate(
                    **enc,
                    **_decode_kwargs(self.tokenizer, self.fmt, self.sampling),
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
        ids, ended = _until_eos(_eos(self.model, self.tokenizer, self.fmt), self._outputs["ids"])
        self.result = _completion(text, stopped, ids, ended, self._outputs["prompt_tokens"], sampling)
