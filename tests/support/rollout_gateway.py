"""Gateways answering through issue 26's scripted rollout: one ``embedq serve`` process per
model (the operator's pair during a rollout: clients of the old model keep theirs, clients
of the new one get theirs) and a client per gateway that keeps calling ``/v1/embeddings``
and ``/v1/search``, keeping every answer for the checks that follow the run."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from .api_fixtures import ServeProcess

INPUTS = 4  # texts per /v1/embeddings request: a response could mix models
PAUSE_S = 0.5  # between one client's rounds: queries go ahead of the bulk drain
REQUEST_TIMEOUT_S = 10  # the gateways' --request-timeout
# A request with no worker of its model running (the new model's before its workers start,
# the old one's after its last worker stopped) waits this long, then gets a 503.
SCORE_TOLERANCE = 2e-3  # float32 cosine in Milvus against one computed here

Vectors = Callable[[str, list[str]], npt.NDArray[np.float32]]


@dataclass
class Call:
    model: str  # the gateway's model ("old" or "new")
    path: str
    texts: list[str]
    status: int
    body: dict[str, Any]
    at: str = field(default_factory=lambda: time.strftime("%H:%M:%S"))

    @property
    def code(self) -> str:
        return str((self.body.get("error") or {}).get("code", ""))

    @property
    def key(self) -> str:
        """What ``tally`` counts it under: "old /v1/search 503 model_mismatch"."""
        outcome = str(self.status) + (f" {self.code}" if self.code else "")
        return f"{self.model} {self.path} {outcome}"


class Gateway:
    """``embedq serve`` for one model, answering under ``name``."""

    def __init__(self, model: str, model_dir: Path, where: Sequence[str], log: Path) -> None:
        self.model, self.name = model, f"embed-{model}"
        args = ["--model", str(model_dir), "--served-model-name", self.name, *where]
        args += ["--request-timeout", str(REQUEST_TIMEOUT_S)]
        self.proc = ServeProcess(args, log)
        self.url = self.proc.url

    def wait_ready(self) -> None:
        self.proc.wait_ready("/healthz", 120)

    def stop(self) -> None:
        self.proc.stop()


class Clients:
    """One thread per gateway: ``/v1/embeddings`` (``INPUTS`` texts), then ``/v1/search``,
    until ``stop``; every answer is kept in ``calls``."""

    def __init__(self, gateways: Sequence[Gateway]) -> None:
        self.gateways = gateways
        self.calls: list[Call] = []
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(g, random.Random(n)), daemon=True)
            for n, g in enumerate(gateways)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            if t.is_alive():
                t.join(3 * REQUEST_TIMEOUT_S)

    def answered(self, model: str, path: str, outcome: str) -> bool:
        """Whether ``model``'s gateway has answered ``path`` with ``outcome`` (as ``tally``
        writes it: "503 model_mismatch")."""
        return any(c.key == f"{model} {path} {outcome}" for c in list(self.calls))

    def _run(self, gateway: Gateway, rng: random.Random) -> None:
        with httpx.Client(base_url=gateway.url, timeout=6 * REQUEST_TIMEOUT_S) as http:
            while not self.stopped.is_set():
                texts = [f"client text {rng.random()} about the corpus" for _ in range(INPUTS)]
                self._call(gateway, http, "/v1/embeddings", texts, {"input": texts})
                query = f"query {rng.random()} of the corpus"
                self._call(gateway, http, "/v1/search", [query], {"query": query, "k": 3})
                self.stopped.wait(PAUSE_S)

    def _call(
        self, gateway: Gateway, http: httpx.Client, path: str, texts: list[str], body: Any
    ) -> None:
        try:
            r = http.post(path, json=body)
            answer = Call(gateway.model, path, texts, r.status_code, r.json())
        except (httpx.HTTPError, ValueError) as exc:  # no answer, or not JSON: status 0
            answer = Call(gateway.model, path, texts, 0, {"error": {"code": repr(exc)}})
        self.calls.append(answer)


def _cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (a * b).sum(axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # type: ignore[no-any-return]


def check_calls(calls: Sequence[Call], vectors: Vectors, models: Sequence[str]) -> list[str]:
    """What went wrong in ``calls``: a response whose vectors are not all of its gateway's
    model (the label included), a search whose scores are not its model's query against its
    model's rows (the other model's collection searched), a status other than 200 or a 503
    (``model_mismatch``: the alias names the other model's collection; ``deadline_exceeded``:
    no worker of the gateway's model runs). Empty: all good."""
    answered = [c for c in calls if c.status == 200]
    for model in models:  # the reference vectors in large batches, cached, before the checks
        texts = [t for c in answered if c.path == "/v1/embeddings" for t in c.texts]
        texts += [
            t
            for c in answered
            if c.path == "/v1/search" and c.model == model
            for t in c.texts + [str(h["text"]) for h in c.body["data"] if h.get("text")]
        ]
        vectors(model, texts)
    wrong: list[str] = []
    for call in calls:
        if call.status == 503 and call.code in ("model_mismatch", "deadline_exceeded"):
            continue
        if call.status != 200:
            wrong.append(f"{call.at} {call.model} {call.path}: {call.status} {call.body}")
            continue
        if call.body.get("model") != f"embed-{call.model}":
            wrong.append(f"{call.at} {call.model} {call.path}: labelled {call.body.get('model')}")
        if call.path == "/v1/embeddings":
            got = np.asarray([d["embedding"] for d in call.body["data"]], dtype=np.float32)
            near = {m: _cosine(got, vectors(m, call.texts)) for m in models}
            if near[call.model].min() < 0.9999:
                of = {m: int((c >= 0.9999).sum()) for m, c in near.items()}
                wrong.append(f"{call.at} {call.model} embeddings: vectors per model {of}")
        else:
            hits = [h for h in call.body["data"] if h.get("text") is not None]
            if not hits:
                continue
            query = vectors(call.model, call.texts)
            rows = vectors(call.model, [str(h["text"]) for h in hits])
            want = _cosine(np.repeat(query, len(hits), axis=0), rows)
            got = np.asarray([h["score"] for h in hits], dtype=np.float32)
            if np.abs(got - want).max() > SCORE_TOLERANCE:
                wrong.append(
                    f"{call.at} {call.model} search: scores {got.round(4).tolist()}, "
                    f"its model's rows would give {want.round(4).tolist()}"
                )
    return wrong


def tally(calls: Sequence[Call]) -> dict[str, int]:
    """Answers by gateway, path and outcome: what the run printed, what the checks count."""
    return dict(sorted(Counter(call.key for call in calls).items()))
