"""A small LangGraph agent that answers questions about a handful of documents, with
Rankway serving both of its models through the OpenAI API:

  retrieve: embeds the documents and the question (langchain-openai OpenAIEmbeddings ->
            POST /v1/embeddings, model "minilm") and keeps the closest document;
  answer:   asks the chat model (ChatOpenAI(streaming=True) -> POST /v1/chat/completions,
            model "smollm2") with that document as context, printing tokens as they come.

Usage: python agent.py [QUESTION]   (RANKWAY_URL, default http://127.0.0.1:8000)
With --json it prints one JSON object instead (what the test reads).
"""

import json
import math
import os
import sys
from typing import TypedDict

from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from langgraph.graph import END, START, StateGraph

BASE = os.environ.get("RANKWAY_URL", "http://127.0.0.1:8000") + "/v1"
DOCUMENTS = [
    "The Zorblat festival is held every March in the mountain town of Quillby.",
    "Rankway is an inference gateway that batches requests for tensor-parallel worker groups.",
    "The river Ammerlin freezes over for six weeks each winter.",
    "Quillby's bakery is famous for its blueberry bread, baked since 1887.",
]

embeddings = OpenAIEmbeddings(base_url=BASE, api_key="unused", model="minilm",
                              check_embedding_ctx_length=False)  # send text, not tiktoken ids
chat = ChatOpenAI(base_url=BASE, api_key="unused", model="smollm2", temperature=0,
                  max_completion_tokens=48, streaming=True)


class State(TypedDict, total=False):
    question: str
    document: str
    answer: str
    chunks: int


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def retrieve(state: State) -> State:
    docs = embeddings.embed_documents(DOCUMENTS)
    query = embeddings.embed_query(state["question"])
    best = max(range(len(DOCUMENTS)), key=lambda i: cosine(query, docs[i]))
    return {"document": DOCUMENTS[best]}


def answer(state: State) -> State:
    messages = [
        ("system", f"Answer the question in one sentence using this fact: {state['document']}"),
        ("user", state["question"]),
    ]
    parts = []
    for chunk in chat.stream(messages):
        parts.append(chunk.content)
        if not JSON:
            print(chunk.content, end="", flush=True)
    if not JSON:
        print()
    return {"answer": "".join(parts), "chunks": len(parts)}


graph = StateGraph(State)
graph.add_node("retrieve", retrieve)
graph.add_node("answer", answer)
graph.add_edge(START, "retrieve")
graph.add_edge("retrieve", "answer")
graph.add_edge("answer", END)
agent = graph.compile()

JSON = "--json" in sys.argv
args = [a for a in sys.argv[1:] if a != "--json"]
question = args[0] if args else "When is the Zorblat festival held?"
if not JSON:
    print(f"Q: {question}")
result = agent.invoke({"question": question})
if JSON:
    print(json.dumps(result))
else:
    print(f"(context: {result['document']})")
