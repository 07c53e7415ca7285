"""The ``/generate`` HTTP API (FastAPI + uvicorn) with KnowLM's request schema.

``POST /generate`` takes ``{"instruction": ..., "input": ..., "parameters": {...}}``
(or a list of those, answered as a list in the same order) and answers
``{"generated_text": ..., "num_output_tokens_cf": N, "error": null}``.
``parameters`` are :data:`knowlm_nb.inference.PARAMETERS` plus ``preset``
(``ie``, the default, or ``chat``). ``GET /health`` says the server is up;
``/openapi.json`` and ``/docs`` describe the API.

Bad requests are refused with a status and a reason, and the server keeps
serving: 400 for a body that is not JSON, 413 for a body over the size cap,
422 for a missing instruction, an unknown or out-of-range parameter,
``max_new_tokens`` over the server's cap, or sampling parameters without
sampling. One lock guards the model, so concurrent requests queue and a
generation is never interleaved with another.

CLI (binds 127.0.0.1 unless ``--host`` says otherwise)::

    python -m knowlm_nb.serve --model DIR [--adapter DIR] [--load-8bit] [--host 127.0.0.1] --port N
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import inference
from .launch import free_port

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 64 * 1024
MAX_NEW_TOKENS_CAP = 256
MAX_BATCH = 16
REQUEST_KEYS = ("instruction", "input", "parameters")


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_item(item: Any, cap: int, where: str = "request") -> tuple[str, str, str, dict]:
    """``(instruction, input, preset, generation overrides)`` of one request, or a RequestError."""
    if not isinstance(item, dict):
        raise RequestError(422, f"{where} must be a JSON object with an 'instruction', "
                                f"got {type(item).__name__}")
    unknown = sorted(set(item) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(422, f"{where}: unknown field(s) {unknown}; known: {list(REQUEST_KEYS)}")
    instruction = item.get("instruction")
    if instruction is None:
        raise RequestError(422, f"{where}: missing 'instruction'")
    if not isinstance(instruction, str) or not instruction.strip():
        raise RequestError(422, f"{where}: 'instruction' must be a non-empty string")
    text = item.get("input", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise RequestError(422, f"{where}: 'input' must be a string")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(422, f"{where}: 'parameters' must be an object")
    params = dict(params)
    preset = params.pop("preset", "ie")
    if preset not in inference.PRESETS:
        raise RequestError(422, f"{where}: unknown preset {preset!r}; "
                                f"known: {', '.join(inference.PRESETS)}")
    try:
        overrides = {k: inference.check_parameter(k, v) for k, v in params.items()}
        if "max_new_tokens" in overrides and overrides["max_new_tokens"] > cap:
            raise RequestError(422, f"{where}: max_new_tokens {overrides['max_new_tokens']} is "
                                    f"over this server's cap of {cap}")
        overrides.setdefault("max_new_tokens",
                             min(cap, inference.PRESETS[preset]["max_new_tokens"]))
        inference.generation_kwargs(preset, **overrides)  # sampling misuse etc.
    except inference.InferenceError as exc:
        raise RequestError(422, f"{where}: {exc}") from None
    return instruction, text, preset, overrides


def parse_body(body: bytes, cap: int, max_bytes: int, max_batch: int):
    """``(items, is_batch)`` from a raw request body, or a RequestError naming the problem."""
    if len(body) > max_bytes:
        raise RequestError(413, f"body of {len(body)} bytes is over the cap of {max_bytes}")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    if isinstance(data, list):
        if not data:
            raise RequestError(422, "an empty list: send at least one request")
        if len(data) > max_batch:
            raise RequestError(422, f"a batch of {len(data)} requests is over the cap of {max_batch}")
        return [parse_item(x, cap, f"request {i}") for i, x in enumerate(data)], True
    return [parse_item(data, cap)], False


class Server:
    """The model, its lock and its counters; :meth:`app` is the FastAPI application."""

    def __init__(self, model, tokenizer, template, name: str = "model",
                 quantization: str = "fp32", cap: int = MAX_NEW_TOKENS_CAP,
                 max_bytes: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.name, self.quantization = name, quantization
        self.cap, self.max_bytes, self.max_batch = cap, max_bytes, max_batch
        self.lock = threading.Lock()
        self.counts = {"answered": 0, "refused": 0, "generations": 0}
        self.in_model = 0
        self.max_in_model = 0

    def run(self, items) -> list[dict]:
        out = []
        for instruction, text, preset, overrides in items:
            prompt = self.template.prompt(instruction, text)
            with self.lock:  # one generation at a time on the model; others queue here
                self.in_model += 1
                self.max_in_model = max(self.max_in_model, self.in_model)
                try:
                    g = inference.complete(self.model, self.tokenizer, prompt, preset, **overrides)
                    out.append({"generated_text": g.text.strip(),
                                "num_output_tokens_cf": g.new_tokens, "error": None})
                except Exception as exc:  # a failed generation is reported, the server goes on
                    out.append({"generated_text": "", "num_output_tokens_cf": 0,
                                "error": f"{type(exc).__name__}: {exc}"})
                finally:
                    self.in_model -= 1
                    self.counts["generations"] += 1
        return out

    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, Field

        class Parameters(BaseModel):
            preset: str = Field("ie", description="ie (greedy/beams, no sampling) or chat (sampling)")
            max_new_tokens: int | None = Field(None, ge=1, le=self.cap)
            num_beams: int | None = Field(None, ge=1, le=16)
            do_sample: bool | None = None
            temperature: float | None = Field(None, gt=0, description="needs sampling")
            top_p: float | None = Field(None, gt=0, le=1, description="needs sampling")
            top_k: int | None = Field(None, ge=0, description="needs sampling")
            repetition_penalty: float | None = Field(None, gt=0, le=10)
            stop: list[str] | None = None
            seed: int | None = Field(None, ge=0)

        class GenerateRequest(BaseModel):
            instruction: str
            input: str = ""
            parameters: Parameters | None = None

        class GenerateResponse(BaseModel):
            generated_text: str
            num_output_tokens_cf: int
            error: str | None

        app = FastAPI(title="KnowLM notebooks /generate",
                      description="KnowLM's request schema; a list of requests is a batch.")
        server = self
        request_schema = {"anyOf": [{"$ref": "#/components/schemas/GenerateRequest"},
                                    {"type": "array",
                                     "items": {"$ref": "#/components/schemas/GenerateRequest"},
                                     "maxItems": self.max_batch}]}

        @app.get("/health")
        def health():
            return {"status": "ok", "model": server.name, "quantization": server.quantization,
                    "max_new_tokens_cap": server.cap, "max_body_bytes": server.max_bytes,
                    "max_concurrent_generations": server.max_in_model, **server.counts}

        @app.post("/generate", response_model=GenerateResponse | list[GenerateResponse],
                  openapi_extra={"requestBody": {"required": True, "content": {
                      "application/json": {"schema": request_schema}}}})
        async def generate(request: Request):
            try:
                length = int(request.headers.get("content-length") or 0)
                if length > server.max_bytes:
                    raise RequestError(413, f"body of {length} bytes is over the cap of "
                                            f"{server.max_bytes}")
                body = b""
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > server.max_bytes:
                        raise RequestError(413, f"body is over the cap of {server.max_bytes} bytes")
                items, batch = parse_body(body, server.cap, server.max_bytes, server.max_batch)
            except RequestError as exc:
                server.counts["refused"] += 1
                return JSONResponse(status_code=exc.status, content={
                    "generated_text": "", "num_output_tokens_cf": 0, "error": exc.reason})
            answers = await run_in_threadpool(server.run, items)
            server.counts["answered"] += len(answers)
            status = 500 if any(a["error"] for a in answers) else 200
            return JSONResponse(status_code=status, content=answers if batch else answers[0])

        # make the request model part of the schema the anyOf refers to
        app.openapi_schema = None
        original = app.openapi

        def openapi():
            if app.openapi_schema is None:
                schema = original()
                from pydantic.json_schema import models_json_schema

                _, defs = models_json_schema([(GenerateRequest, "validation")],
                                             ref_template="#/components/schemas/{model}")
                schema.setdefault("components", {}).setdefault("schemas", {}).update(
                    defs.get("$defs", {}))
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi
        return app


def create_app(model_dir: str | Path, adapter: str | Path | None = None,
               quantization: str = "fp32", template: str = "alpaca",
               cap: int = MAX_NEW_TOKENS_CAP, max_bytes: int = MAX_BODY_BYTES,
               max_batch: int = MAX_BATCH):
    """Load the model and return the FastAPI app serving it."""
    from .instruct import load_template

    model, tok = inference.load(model_dir, quantization, adapter=adapter)
    server = Server(model, tok, load_template(template), name=Path(model_dir).name,
                    quantization=quantization, cap=cap, max_bytes=max_bytes, max_batch=max_batch)
    return server.app()


# ------------------------------------------------------------ in the background

class Background:
    """A server process started by :func:`start`; ``url``, ``stop()``, usable with ``with``."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def start(model_dir: str | Path, port: int | None = None, host: str = DEFAULT_HOST,
          timeout: float = 300, log: Path | None = None, **options) -> Background:
    """Start ``python -m knowlm_nb.serve`` in a child process and wait until /health answers.

    ``options`` become flags: ``adapter="DIR"``, ``load_8bit=True``, ``template="alpaca_short"``,
    ``max_new_tokens_cap=64``, ``max_body_bytes=...``, ``max_batch=...``.
    """
    import httpx

    port = port or free_port(host)
    cmd = [sys.executable, "-m", "knowlm_nb.serve", "--model", str(model_dir),
           "--host", host, "--port", str(port)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value not in (None, False):
            cmd += [flag, str(value)]
    import tempfile

    if log is None:
        fd, name = tempfile.mkstemp(prefix="knowlm-serve-", suffix=".log")
        os.close(fd)
        log = name
    log = Path(log)
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    fh.close()
    url = f"http://{host}:{port}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-2000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Background(proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the server did not answer /health within {timeout} s; log: {log}")


# ------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m knowlm_nb.serve",
                                 description="Serve a model over HTTP with KnowLM's /generate schema.")
    ap.add_argument("--model", required=True, help="a local Hugging Face model folder")
    ap.add_argument("--adapter", help="a PEFT LoRA adapter folder to put on top")
    ap.add_argument("--load-8bit", action="store_true",
                    help="bitsandbytes 8-bit (KnowLM's --load_8bit)")
    ap.add_argument("--int8", action="store_true", help="torchao int8 weight-only instead")
    ap.add_argument("--host", default=DEFAULT_HOST,
                    help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--template", default="alpaca", help="prompt template (knowlm_nb/templates)")
    ap.add_argument("--max-new-tokens-cap", type=int, default=MAX_NEW_TOKENS_CAP)
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.load_8bit and args.int8:
        ap.error("choose one of --load-8bit and --int8")
    if not 0 < args.port < 65536:
        ap.error(f"--port must be 1..65535, got {args.port}")
    quantization = "bnb8" if args.load_8bit else "int8" if args.int8 else "fp32"
    import uvicorn

    try:
        app = create_app(args.model, args.adapter, quantization, args.template,
                         args.max_new_tokens_cap, args.max_body_bytes, args.max_batch)
    except (inference.InferenceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
