"""Base and tuned columns on a serving engine: one OpenAI-compatible server holding the base model and every LoRA
adapter, loaded at run time, so a room of participants shares one GPU instead of the app's process.

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE_FOLDER --served-model-name gemma-3-270m \\
        --enable-lora --max-loras 8 --max-lora-rank 64
    engine = ServeEngine("http://127.0.0.1:8000", "gemma-3-270m")
    engine.register("run-1-3f2a9c1e", "/data/runs/run-1/adapter")  # POST /v1/load_lora_adapter (vLLM's runtime API)
    engine.backend("qa")                                # the base column: OpenAIBackend on the base model's name
    engine.backend("qa", "run-1-3f2a9c1e", "gemma-3-270m + run-1 @ 127.0.0.1:8000")  # the tuned column

The server reads the adapter from `lora_path`, a path on the app's disk: run it on the same machine (or a shared
disk). An adapter is registered under its name plus a fingerprint of its weights file, so a resumed run's new
weights get a new name instead of the server's stale copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from finetune.generate import BackendError, OpenAIBackend, api_root

LORA_HELP = "start vLLM with --enable-lora and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"


def lora_name(name: str, adapter_dir: str | Path) -> str:
    """The adapter's name on the server: `name` plus a fingerprint of its weights file (size and modification time)."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    stat = weights.stat() if weights.is_file() else None
    stamp = f"{stat.st_size}-{stat.st_mtime_ns}" if stat else "none"
    return f"{name}-{hashlib.sha1(stamp.encode()).hexdigest()[:8]}"


def _message(response: httpx.Response) -> str:
    """The server's own words: vLLM's `{"error": {"message"}}` or `{"message"}`, FastAPI's `{"detail"}`, or text."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:300]
    if isinstance(body, dict):
        error = body.get("error")
        found = error.get("message") if isinstance(error, dict) else error
        found = found or body.get("message") or body.get("detail")
        if found:
            return str(found)[:300]
    return str(body)[:300]


class ServeEngine:
    """An OpenAI-compatible server with vLLM's runtime LoRA API, serving the base model as `model`."""

    def __init__(self, url: str, model: str = "", timeout_s: float = 30.0):
        self.api = api_root(url)
        self.root = self.api.removesuffix("/v1")
        self.model = model.strip()
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return httpx.request(method, self.root + path, timeout=self.timeout_s, **kwargs)
        except httpx.TimeoutException:
            raise BackendError(f"{self} did not answer within {self.timeout_s:g} s.") from None
        except httpx.HTTPError as e:
            raise BackendError(f"Could not connect to {self}: is it running? ({e})") from None

    def __str__(self) -> str:
        return f"the serving engine at {self.root}"

    def models(self) -> list[str]:
        """Names the server answers to (`GET /v1/models`): vLLM lists the base model and the adapters it holds."""
        response = self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise BackendError(
                f"The serving engine at {self.root} answered HTTP {response.status_code} on /v1/models: "
                f"{_message(response)}"
            )
        try:
            return [m["id"] for m in response.json().get("data", [])]
        except (ValueError, AttributeError, KeyError, TypeError):
            raise BackendError(f"{self.root}/v1/models is not an OpenAI-compatible model list.") from None

    def register(self, name: str, path: str | Path) -> None:
        """Load the adapter folder `path` as `name` (`POST /v1/load_lora_adapter`); one the server holds already
        counts as loaded."""
        body = {"lora_name": name, "lora_path": str(Path(path).resolve())}
        response = self._request("POST", "/v1/load_lora_adapter", json=body)
        if response.status_code == 200:
            return
        message = _message(response)
        if response.status_code == 400 and "already" in message.lower():  # another user registered it first
            return
        if response.status_code == 404 and message in ("", "Not Found"):  # the route itself is missing
            raise BackendError(
                f"The serving engine at {self.root} cannot load LoRA adapters at run time "
                f"(HTTP 404 on /v1/load_lora_adapter): {LORA_HELP}."
            )
        missing = "no adapter found" in message.lower()  # vLLM's words when it cannot read lora_path
        hint = " The server must read the app's adapter folder: run it on this machine." if missing else ""
        raise BackendError(
            f"The serving engine refused adapter {name!r} (HTTP {response.status_code}): {message}.{hint}"
        )

    def backend(self, template: str, adapter: str | None = None, label: str | None = None) -> OpenAIBackend:
        """A column on this server: the base model, or the registered adapter `adapter`, prompted with `template`."""
        return OpenAIBackend(self.api, adapter or self.model, template=template, label=label)
