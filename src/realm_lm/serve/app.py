"""`realm serve --from RUN_DIR`: answers with their evidence over HTTP (FastAPI + uvicorn).

One :class:`~realm_lm.answer.Answerer` is loaded at start-up and shared by every request. Requests are answered one
at a time on the event loop's own thread: a forward pass already uses every core, so concurrent clients queue
rather than oversubscribe, and torch ran 15-40 % slower from a worker thread in benchmarks/serve_latency.py.

    POST /ask     {"question": "...", "n": 3, "k": 5}  -> answers (text, probability, evidence block, span) + hits
    GET  /health  -> the run, corpus and retriever the server answers from
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from realm_lm.answer import Answerer
from realm_lm.config import MAX_ANSWERS, MAX_BLOCKS_READ
from realm_lm.retrieval import MAX_QUESTION_CHARS, BadQuestionError


class AskRequest(BaseModel):
    question: str = Field(description=f"the question (1 to {MAX_QUESTION_CHARS} characters)")
    n: int = Field(3, ge=1, le=MAX_ANSWERS, description="answers to return")
    k: int | None = Field(None, ge=1, le=MAX_BLOCKS_READ,
                          description="blocks to retrieve and read (default: the run's reader.top_k)")


def create_app(answerer: Answerer, about: dict[str, Any]) -> FastAPI:
    """``about``: what /health reports besides what the answerer knows (e.g. the run folder and corpus store)."""
    app = FastAPI(title="realm-lm", description="open-domain question answering with evidence (REALM)")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **about, "retriever": "realm" if answerer.dense else "bm25",
                "blocks": len(answerer.store), "top_k": answerer.top_k}

    @app.post("/ask")
    async def ask(request: AskRequest) -> dict[str, Any]:  # async: runs on the loop's thread, one at a time
        t0 = time.perf_counter()
        try:
            response = answerer.answer([request.question], k=request.k, top_n=request.n)[0]
        except BadQuestionError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
        return {**response.to_json(), "seconds": round(time.perf_counter() - t0, 4)}

    return app
