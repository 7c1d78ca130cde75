"""Base and tuned columns on a serving engine: one OpenAI-compatible server holding the base model and every LoRA
adapter, loaded at run time, so a room of participants shares one GPU instead of the app's process.

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE_FOLDER --served-model-name gemma-3-270m \\
        --enable-lora --max-loras 8 --max-lora-rank 64
    engine = ServeEngine("http://127.0.0.1:8000", "gemma-3-270m", max_lora_rank=64)  # vLLM's --max-lora-rank
    engine.register("run-1-3f2a9c1e", "/data/runs/run-1/adapter")  # POST /v1/load_lora_adapter (vLLM's runtime API)
    engine.backend("qa")                                # the base column: OpenAIBackend on the base model's name
    engine.backend("qa", "run-1-3f2a9c1e", "gemma-3-270m + run-1 @ 127.0.0.1:8000")  # the tuned column

The server reads the adapter from `lora_path`, a path on the app's disk: run it on the same machine (or a shared
disk). An adapter is registered under its name plus a fingerprint of its weights file, so a resumed run's new
weights get a new name instead of the server's stale copy; registering it unloads the older fingerprints
(`POST /v1/unload_lora_adapter`). An adapter of a rank above the server's `--max-lora-rank` is refused before it is
sent, with what to do.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx

from finetune.backends import BackendError, OpenAIBackend, api_root
from finetune.runs import ADAPTER_CONFIG

LORA_HELP = "start vLLM with --enable-lora and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"


def lora_name(name: str, adapter_dir: str | Path) -> str:
    """The adapter's name on the server: `name` plus a fingerprint of its weights file (size and modification time)."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    stat = weights.stat() if weights.is_file() else None
    stamp = f"{stat.st_size}-{stat.st_mtime_ns}" if stat else "none"
    return f"{name}-{hashlib.sha1(stamp.encode()).hexdigest()[:8]}"


def _rank(adapter_dir: Path) -> int | None:
    """The LoRA rank `r` of `adapter_config.json`; None when it cannot be read (the server then says why)."""
    try:
        r = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("r")
    except (OSError, ValueError, AttributeError):
        return None
    return r if isinstance(r, int) else None


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

    def __init__(self, url: str, model: str = "", timeout_s: float = 30.0, max_lora_rank: int = 64):
        self.api = api_root(url)
        self.root = self.api.removesuffix("/v1")
        self.model = model.strip()
        self.timeout_s = timeout_s
        self.max_lora_rank = max_lora_rank  # the server's --max-lora-rank (FINETUNE_SERVE_MAX_LORA_RANK)

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
        counts as loaded. Older fingerprints of the same adapter (`lora_name`) are unloaded."""
        path = Path(path).resolve()
        rank = _rank(path)
        if rank is not None and rank > self.max_lora_rank:
            # vLLM's own refusal comes late and names neither setting; and a rank 128 is one click in the Train form.
            raise BackendError(
                f"Adapter {name!r} has LoRA rank {rank}, above the serving engine's max LoRA rank "
                f"{self.max_lora_rank}: train it again with lora_r {self.max_lora_rank} or lower, or restart vLLM "
                f"with --max-lora-rank {rank} or more and set FINETUNE_SERVE_MAX_LORA_RANK to match."
            )
        self._unload_older(name)
        response = self._request("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
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

    def _unload_older(self, name: str) -> None:
        """Unload the server's copies of `name`'s adapter with older weights (`lora_name`: name-fingerprint)."""
        # Each resume of a run brings a new fingerprint and vLLM keeps every name it loaded, so stale copies would
        # fill its --max-loras. The app never asks for an old fingerprint again, so they go before the new one loads.
        found = re.fullmatch(r"(.+)-[0-9a-f]{8}", name)
        if found is None:
            return
        same = re.compile(re.escape(found[1]) + r"-[0-9a-f]{8}")
        for old in self.models():
            if old != name and same.fullmatch(old):
                self.unload(old)

    def unload(self, name: str) -> None:
        """Unload the adapter `name` (`POST /v1/unload_lora_adapter`); one the server no longer holds is no error."""
        response = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code == 200:
            return
        message = _message(response)
        if response.status_code in (400, 404) and "found" in message.lower():  # "cannot be found": unloaded already
            return
        raise BackendError(
            f"The serving engine refused to unload adapter {name!r} (HTTP {response.status_code}): {message}."
        )

    def backend(self, template: str, adapter: str | None = None, label: str | None = None) -> OpenAIBackend:
        """A column on this server: the base model, or the registered adapter `adapter`, prompted with `template`."""
        return OpenAIBackend(self.api, adapter or self.model, template=template, label=label)
