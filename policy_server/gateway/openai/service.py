"""``OpenAIService``: OpenAI's completions and chat completions on the LLM policy, with neither HTTP
nor Ray. It shares the policy's tokenizer, limits and backend through ``LLMService``."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from policy_server.errors import InvalidRequest, NotFound
from policy_server.gateway.llm.service import Generated, LLMService
from policy_server.gateway.openai.wire import ChatRequest, CompletionRequest
from policy_server.llm.generation import GenerationParams, Sample


class OpenAIService:
    def __init__(self, llm: LLMService) -> None:
        self.llm = llm
        self.spec = llm.spec

    def _openai_params(self, body: CompletionRequest | ChatRequest, prompt_len: int) -> GenerationParams:
        if body.model is not None and body.model != self.spec.model_id:
            raise NotFound(f"body.model: no model {body.model!r}; this server serves {self.spec.model_id!r}")
        stops = self.llm.stop_strings(body.stop, "body.stop") if body.stop else (self.spec.end_token,)
        max_tokens = body.max_tokens or min(self.llm.limits.max_new_tokens, 256)
        return self.llm.params(
            prompt_len, max_tokens, body.n, stops, ("body.n", "body.max_tokens"),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        )

    async def completions(self, body: CompletionRequest) -> dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise InvalidRequest.at("body.prompt", "give at least one prompt")
        outs = []
        for i, text in enumerate(prompts):
            ids = self.llm.prompt_ids(text, self.llm.limits.max_input_length, False, f"body.prompt.{i}" if len(prompts) > 1 else "body.prompt")
            outs.append((text, ids, self._openai_params(body, len(ids))))
        generated = await asyncio.gather(*(self.llm.generate(ids, params, False) for _, ids, params in outs))
        choices = []
        for (text, _, _), out in zip(outs, generated):
            for sample, raw in zip(out.samples, out.texts):
                completion = _before_stop(raw, sample)
                choice: dict[str, Any] = {
                    "index": len(choices),
                    "text": (text + completion) if body.echo else completion,
                    "finish_reason": sample.finish_reason,
                    "logprobs": self._completion_logprobs(sample) if body.logprobs is not None else None,
                }
                choices.append(choice)
        return self._openai_answer("text_completion", "cmpl", choices, generated)

    async def chat(self, body: ChatRequest) -> dict[str, Any]:
        text = self.llm.chat_prompt([m.model_dump() for m in body.messages])
        ids = self.llm.prompt_ids(text, self.llm.limits.max_input_length, False, "body.messages", special=False)
        out = await self.llm.generate(ids, self._openai_params(body, len(ids)))  # special tokens left out
        choices = []
        for i, (sample, text) in enumerate(zip(out.samples, out.texts)):
            content = _before_stop(text, sample)
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": content},
                "finish_reason": sample.finish_reason,
                "logprobs": {"content": self._chat_logprobs(sample)} if body.logprobs else None,
            })
        return self._openai_answer("chat.completion", "chatcmpl", choices, [out])

    def _tokens(self, sample: Sample) -> list[str]:
        return [self.llm.decode([t], skip_special_tokens=False) for t in sample.completion_ids]

    def _completion_logprobs(self, sample: Sample) -> dict[str, Any]:
        tokens = self._tokens(sample)
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        return {"tokens": tokens, "token_logprobs": list(sample.log_probs), "top_logprobs": None, "text_offset": offsets}

    def _chat_logprobs(self, sample: Sample) -> list[dict[str, Any]]:
        return [
            {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
            for tok, lp in zip(self._tokens(sample), sample.log_probs)
        ]

    def _openai_answer(self, kind: str, prefix: str, choices: list[dict[str, Any]], outs: list[Generated]) -> dict[str, Any]:
        prompt_tokens = sum(len(o.prompt_ids) for o in outs)
        completion_tokens = sum(len(s.completion_ids) for o in outs for s in o.samples)
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.spec.model_id,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": f"policy-server-v{max(o.version for o in outs)}",
        }


def _before_stop(text: str, sample: Sample) -> str:
    """OpenAI leaves the stop sequence out of the answer."""
    if sample.stop_string and sample.stop_string in text:
        return text[: text.index(sample.stop_string)]
    return text
