"""Unmodified OpenAI clients against Rankway: the `openai` SDK (chat and completions,
streamed and whole) and langchain-openai's ChatOpenAI (streaming). Prints one JSON
object with what each client got; tests/tests/generation_gateway.rs checks it.

Usage: python tests/clients/openai_clients.py BASE_URL MODEL QUESTION
"""

import json
import sys

from langchain_openai import ChatOpenAI
from openai import OpenAI

base, model, question = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
messages = [{"role": "user", "content": question}]
out = {}

chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
out["chat"] = {"text": chat.choices[0].message.content, "finish": chat.choices[0].finish_reason,
               "usage": [chat.usage.prompt_tokens, chat.usage.completion_tokens]}

chunks = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                        max_completion_tokens=24, stream=True,
                                        stream_options={"include_usage": True})
text, finish, usage, n = "", None, None, 0
for c in chunks:
    n += 1
    if c.choices:
        text += c.choices[0].delta.content or ""
        finish = c.choices[0].finish_reason or finish
    if c.usage:
        usage = [c.usage.prompt_tokens, c.usage.completion_tokens]
out["chat_stream"] = {"text": text, "finish": finish, "usage": usage, "chunks": n}

comp = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=8)
out["completion"] = {"text": comp.choices[0].text, "finish": comp.choices[0].finish_reason}
text = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True))
out["completion_stream"] = {"text": text}

llm = ChatOpenAI(base_url=f"{base}/v1", api_key="unused", model=model, temperature=0,
                 max_completion_tokens=24, streaming=True, max_retries=0)
parts = [chunk.content for chunk in llm.stream(question)]
out["langchain"] = {"text": "".join(parts), "chunks": len(parts)}

try:
    client.chat.completions.create(model=model, messages=messages, logprobs=True)
    out["refused"] = None
except Exception as e:  # the SDK raises BadRequestError with the server's message
    out["refused"] = {"status": getattr(e, "status_code", None), "message": str(e)}

print(json.dumps(out))
