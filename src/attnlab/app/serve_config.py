"""The settings of ``attnlab serve`` (``ServeConfig``) and its address rule, kept apart from the server
so that the command line can build its flags from them without loading PyTorch or the web stack."""

import ipaddress
import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ServeConfig", "LOOPBACK_NAMES", "is_loopback", "check_bind", "serve_config_fields"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class ServeConfig:
    """Where the server listens, who may call it, how it batches, and the limits of one request."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required on every /v1 request when set
    no_auth: bool = False  # allow a non-loopback address without a key, on purpose
    batching: bool = True  # gather concurrent requests into one decoding batch
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    batch_tokens: int = 4096  # a batch closes at this many source tokens × beam
    decode_batch_size: int = 64  # sentences per search, as `attnlab translate --batch-size`
    max_sentences: int = 64  # sentences in one /v1/translate request
    max_chars: int = 2000  # characters in one sentence or prompt
    max_tokens: int = 256  # source tokens in one sentence (never more than the model's positions)
    max_beam: int = 8
    max_new_tokens: int = 1000
    max_attention_sentences: int = 8  # sentences in one request with "attention": true
    max_body_bytes: int = 1 << 20
    max_queued: int = 1024  # requests waiting for one model's worker; more get 503
    max_connections: int = 512  # open connections; more get 503 (uvicorn's limit_concurrency)
    graceful_timeout_s: float = 60.0  # at shutdown, how long requests in flight may take
    access_log: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("the API key must have at least 8 characters")
        if not (math.isfinite(self.batch_wait_ms) and self.batch_wait_ms >= 0):
            raise ValueError(f"batch_wait_ms must be a finite number >= 0, got {self.batch_wait_ms}")
        for name in ("batch_tokens", "decode_batch_size", "max_sentences", "max_chars", "max_tokens",
                     "max_beam", "max_new_tokens", "max_attention_sentences", "max_body_bytes",
                     "max_queued", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def limits(self) -> dict[str, int]:
        """The limits of one request, as /v1/models reports them."""
        names = ("max_sentences", "max_chars", "max_tokens", "max_beam", "max_new_tokens",
                 "max_attention_sentences", "max_body_bytes")
        return {name: getattr(self, name) for name in names}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") can be reached from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(config: ServeConfig) -> None:
    """Refuse to listen beyond this machine without an API key, unless ``no_auth`` says so."""
    if config.api_key and config.no_auth:
        raise ValueError("give either an API key or --no-auth, not both")
    if not is_loopback(config.host) and not config.api_key and not config.no_auth:
        raise ValueError(
            f"binding to {config.host} makes the service reachable from other machines: give --api-key KEY "
            "(or the ATTNLAB_API_KEY environment variable), or --no-auth to serve without one on purpose"
        )


def serve_config_fields() -> list[tuple[str, type, Any]]:
    """The settings the command line offers as flags (name, type, default), from ``ServeConfig``."""
    skip = {"host", "port", "api_key", "no_auth", "batching", "access_log"}
    return [(f.name, f.type, f.default) for f in fields(ServeConfig) if f.name not in skip]
