"""Serving job configuration: the engine, replicas, keys and adapters, validated from YAML."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.core.config import ModelSettings, RegistrySettings, Section


class EngineSettings(Section):
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="vLLM compute dtype. float32 on CPU: bf16 flips near-tied tokens."
    )
    max_model_len: int = Field(2048, ge=64, description="Context length (prompt + answer).")
    enforce_eager: bool = Field(
        True, description="Skip graph compilation: on CPU it costs ~2 min at every start."
    )
    kv_cache_gb: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE: KV cache per replica.")
    max_lora_rank: int = Field(
        16, ge=1, description="vLLM max_lora_rank: largest LoRA rank an adapter may have."
    )
    max_loras: int = Field(
        4, ge=1, description="vLLM max_loras: adapters one batch may mix (LRU in the engine)."
    )
    stream_batching_ms: float = Field(
        50,
        ge=0,
        description="Ray Serve LLM gathers a stream's chunks this long before passing them on "
        "(fewer messages between replicas); the first token waits for it too. 0 = every chunk.",
    )


class AutoscalingSettings(Section):
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(1, ge=1, description="Upper bound under load.")
    target_ongoing_requests: float = Field(
        4, gt=0, description="Requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(5, ge=0, description="Sustained load before adding replicas.")
    downscale_delay_s: float = Field(60, ge=0, description="Idle time before removing replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        return self


class AuthSettings(Section):
    api_keys_env: str = Field(
        "FEDFORGE_API_KEYS", description="Env var holding comma-separated keys or sha256 hashes."
    )
    api_keys_file: str | None = Field(
        None, description="File with one key or `sha256:<hex>` per line (hashes preferred)."
    )
    required: bool = Field(True, description="Refuse to start without at least one key.")
    rate_limit_per_minute: float | None = Field(
        None,
        gt=0,
        description="Completions per minute each key may send (429 + Retry-After past it); "
        "null = no limit. Counted per ingress replica.",
    )
    rate_limit_burst: int = Field(
        10, ge=1, description="Requests a key may send at once before the per-minute rate applies."
    )
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute each key may ask for, counted when a request is admitted "
        "as its prompt estimate (characters / 4) plus max_tokens x n (429 + Retry-After past "
        "it; a key may spend one minute's worth at once). null = no token limit.",
    )
    max_tracked_callers: int = Field(
        10_000,
        ge=1,
        description="Callers (keys, or client addresses when no keys are configured) whose "
        "budgets one ingress replica remembers; past it the least recently seen is forgotten, "
        "so the table cannot grow without bound.",
    )


class LimitSettings(Section):
    """The request contract the ingress enforces before a body reaches the engine."""

    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body accepted; larger gets 413."
    )
    max_json_depth: int = Field(
        16, ge=4, description="Deepest nesting of objects and arrays a body may have (400)."
    )
    max_n: int = Field(4, ge=1, description="Largest `n` (choices per request).")
    max_logprobs: int = Field(
        5,
        ge=0,
        le=20,
        description="Largest `logprobs` (completions) and `top_logprobs` (chat).",
    )
    max_prompts: int = Field(
        16, ge=1, description="Most prompts in one completions request (a list prompt)."
    )
    max_messages: int = Field(128, ge=1, description="Most messages in one chat request.")
    max_prompt_chars: int = Field(
        32_000,
        ge=1,
        description="Most characters of prompt text in one request (all prompts or message "
        "contents together), refused before anything is tokenised.",
    )
    max_request_tokens: int = Field(
        4096,
        ge=1,
        description="Most tokens one request may ask the engine to generate: max_tokens x n "
        "(without max_tokens, the context length counts). Keeps one caller from holding the "
        "engine for minutes.",
    )


class AdapterSettings(Section):
    enabled: bool = Field(
        True,
        description="Serve the registry's LoRA adapters next to the base model: `<name>` is the "
        "version aliased `production`, `<name>:<version>` a fixed version.",
    )
    refresh_seconds: float = Field(
        10,
        gt=0,
        description="How often the ingress re-reads the registry; a promote or rollback is served "
        "within this interval, without restarting replicas.",
    )
    models: list[str] | None = Field(
        None, description="Registered model names to serve; null serves every registered model."
    )
    same_base_only: bool = Field(
        True,
        description="Skip versions whose `fedforge.base_model` lineage tag names another base "
        "model: vLLM cannot load them. Versions without the tag are served.",
    )
    max_per_replica: int = Field(
        8,
        ge=1,
        description="Adapters one replica keeps loaded (Ray Serve multiplexing, least recently "
        "used evicted); requests prefer replicas that already hold their adapter.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where replicas keep downloaded adapter versions. Default: "
        "<state dir>/serve/adapters (each node writes its own copy).",
    )


class RequestLogSettings(Section):
    enabled: bool = Field(
        False,
        description="Log every answer: request id, time, key id (a hash prefix), model, the "
        "version and adapter digest that answered, token counts. Read by `fedforge audit "
        "request` and `fedforge drift report`.",
    )
    dir: str | None = Field(
        None,
        description="Where ingress replicas write it. Default: <state dir>/serve/request-log "
        "(on a cluster, a shared mount, or each node keeps its own replicas' lines).",
    )
    retention_days: int = Field(
        30, ge=1, description="Days of log kept; older files are removed at each new day."
    )
    prompt_features: bool = Field(
        False,
        description="Also log features of each prompt (sizes, character mix, a hashed n-gram "
        "sketch; never the text), what `fedforge drift report` compares with the training data.",
    )
    prompt_text: bool = Field(
        False,
        description="Also log the prompt's text. Off unless the traffic's owners agreed to keep "
        "it: the log then holds personal data.",
    )


class DriftSettings(Section):
    """What `fedforge drift report` and `drift retrain` compare (read from the serve config)."""

    window: str = Field("24h", description="Served traffic compared: the last 30m, 24h, 7d, ...")
    alpha: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="False-positive rate of a drift verdict: the chance that traffic from the "
        "training distribution is called drifted (Bonferroni over the features' tests).",
    )
    min_prompts: int = Field(
        100, ge=10, description="Fewer logged prompts in the window: no verdict (too few)."
    )
    permutations: int = Field(
        999, ge=99, description="Permutations of the sketch's kernel test (its smallest p-value)."
    )


class ServeConfig(Section):
    name: str = Field("fedforge", description="Ray Serve application name.")
    model_id: str = Field("fedforge-base", description="Model id clients ask for.")
    model: ModelSettings = Field(default_factory=ModelSettings)
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Where vLLM runs.")
    cpus_per_replica: int = Field(1, ge=1, description="CPUs in each replica's bundle.")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica works on at once; more wait in its queue."
    )
    max_queued_requests: int = Field(
        32,
        ge=1,
        description="Requests allowed to wait for a replica; past it the endpoint answers 503 "
        "with Retry-After instead of queueing without bound.",
    )
    http_host: str = Field("127.0.0.1", description="Serve HTTP proxy host.")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP proxy port.")
    metrics_port: int = Field(
        9464,
        ge=1,
        le=65535,
        description="Prometheus scrape port (/metrics) of a local Ray head: Serve request counts "
        "and errors by status, vLLM TTFT, inter-token latency, queue length. On a cluster, "
        "`ray start --metrics-export-port` sets it per node.",
    )
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    request_log: RequestLogSettings = Field(default_factory=RequestLogSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)

    @model_validator(mode="after")
    def _adapter_model_ids(self) -> ServeConfig:
        if ":" in self.model_id:
            raise ValueError(
                f"model_id '{self.model_id}' must not contain ':' (it separates adapter versions)"
            )
        tokens = self.auth.tokens_per_minute
        if tokens is not None and tokens < self.limits.max_request_tokens:
            raise ValueError(
                f"auth.tokens_per_minute ({tokens}) is below limits.max_request_tokens "
                f"({self.limits.max_request_tokens}): a request of the allowed size could never "
                "be admitted; raise the first or lower the second"
            )
        return self
