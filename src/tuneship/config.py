"""The whole run's configuration: pydantic models, YAML files and dotted `--set` overrides.

Every stage reads the same resolved `Config`, and the resolved config is written into the run
directory, so that one file says exactly what a run did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneship.errors import ConfigError

EMBEDDED_MODEL = "smollm2-135m-instruct"

LEARNING_RATE_HARD = (1e-6, 1e-2)
LEARNING_RATE_USUAL = (2e-5, 1e-3)
DEFAULT_MIN_RECALL = 0.8

Objective = Literal["sft", "dpo", "kto"]
Quant = Literal["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
OutType = Literal["f16", "bf16", "f32"]


class Section(BaseModel):
    """A config section: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("tuneship-run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    dir: Path = Field(Path("runs"), description="parent folder; the run lives in <dir>/<name>")


class ModelSection(Section):
    base: str = Field(
        EMBEDDED_MODEL,
        description="local HF folder, hub id, .gguf file, or the embedded smollm2-135m-instruct",
    )
    adapter_from: str | None = Field(None, description="a previous run's adapter/ folder to continue from")
    train_on_quant: Quant | OutType | None = Field(
        None,
        description="train on the base as this GGUF quant serves it (its weights dequantized, made once in the "
        "cache), for an adapter that serves on the base's quant (export.merge: false); the loop's cycles in adapter "
        "format set it to the quant they serve on",
    )


class S3Section(Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (R2, MinIO); env AWS_ENDPOINT_URL")
    region: str | None = None
    local_dir: Path | None = Field(None, description="local mirror; default <cache>/s3/<bucket>/<key>")
    max_attempts: int = Field(5, ge=1, le=20)
    timeout: float = Field(20.0, gt=0, le=600, description="seconds to wait for the endpoint to connect or answer")


class DataSection(Section):
    sources: list[str] = Field(default_factory=list, description="paths, globs, folders or s3:// URIs")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "plain_text"] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="map your column names to prompt/response/system, e.g. {prompt: question, response: answer}",
    )
    eval_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 42
    near_duplicate_similarity: float = Field(0.9, gt=0.0, le=1.0)
    transcripts: Literal["auto", "conversations", "pairs"] = Field(
        "auto",
        description="how a .txt/.md transcript splits: conversations (a blank line before a user turn ends one), "
        "pairs (every user/assistant pair), auto (pairs when nothing ever ends a conversation)",
    )
    strict: bool = Field(False, description="stop before training when the audit has any finding")
    s3: S3Section = Field(default_factory=S3Section)


class ChatSection(Section):
    template: Literal["auto", "chatml", "llama-3", "mistral", "zephyr", "gemma", "phi-3", "qwen"] = "auto"
    system_prompt: str | None = Field(
        None, description="added to conversations without one; null keeps the template's own behaviour"
    )
    loss_on: Literal["all_assistant", "last_assistant", "everything"] = "all_assistant"


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    qlora: bool = Field(False, description="4-bit base via bitsandbytes (CUDA only)")


class TrainSection(Section):
    objective: Objective = Field(
        "sft",
        description="sft: answers; dpo: chosen vs rejected pairs (TRL DPOTrainer); kto: answers labelled "
        "desirable or not (TRL KTOTrainer)",
    )
    beta: float = Field(0.1, gt=0.0, le=10.0, description="dpo/kto: how close to the reference model (higher: closer)")
    max_seq_len: int = Field(1024, ge=16, le=131072)
    epochs: float = Field(3.0, gt=0.0, le=1000.0)
    max_steps: int = Field(-1, ge=-1, description="overrides epochs when > 0")
    learning_rate: float = 2e-4
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    packing: bool = Field(True, description="padding-free batches: examples end to end, attention kept per example")
    shared_prefix: bool = Field(
        True, description="packed batches compute the start all their examples share (system prompt) once; exact"
    )
    supervised_logits: bool = Field(True, description="logits and loss only where a supervised token is predicted")
    fused_lora: bool = Field(
        True,
        description="training without autocast (fp32): each LoRA layer's forward and backward in one autograd "
        "function (gradients equal to PEFT's to rounding)",
    )
    kernels: Literal["torch", "liger"] = Field("torch", description="liger: Liger's Triton kernels (CUDA only)")
    min_free_disk_gb: float = Field(1.0, ge=0.0, description="disk guard: stop before a save would leave less")
    stop_when_learned: bool = Field(
        False,
        description="stop at an epoch's end once greedy decoding gives every training answer exactly and their mean "
        "loss is below train.stop_loss (epochs / max_steps stay the budget); on for the loop's cycles",
    )
    stop_loss: float = Field(0.05, gt=0.0, description="train.stop_when_learned: the mean answer loss to reach")
    stop_margin: float = Field(
        1.0,
        ge=0.0,
        description="train.stop_when_learned: by how much (in logits) every answer token must beat the next most "
        "likely one: an answer learned by a hair flips in another runtime (llama.cpp's 8-bit activations) or on "
        "other weights (the loop's cycles in adapter format train on the base quant they serve on)",
    )
    focus_unlearned: bool = Field(
        True,
        description="train.stop_when_learned: after a learned check, the next epochs train the examples not learned "
        "yet and as many learned ones, those learned by the smallest margin (one process only)",
    )
    train_layers: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="share of the model's layers, from the top, whose LoRA weights train; below them the adapter "
        "stays as loaded (model.adapter_from) with no LoRA dropout, the backward pass stops early, and each "
        "example's output of those layers is computed once and kept (packed batches) (loop.train_layers in cycles)",
    )
    sample_every: int = Field(0, ge=0, description="generate sample answers every N steps (0: off)")
    sample_prompts: list[str] = Field(default_factory=list)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])

    @field_validator("learning_rate")
    @classmethod
    def _learning_rate_in_hard_range(cls, value: float) -> float:
        low, high = LEARNING_RATE_HARD
        if not low <= value <= high:
            raise ValueError(f"must be within [{low:g}, {high:g}] (got {value:g}); LoRA usually wants 1e-4 to 5e-4")
        return value


class EvalSection(Section):
    prompts: Path | None = Field(None, description="JSONL of questions (and expected answers) checked on every model")
    max_prompts: int = Field(50, ge=0, description="eval-split examples to generate for")
    train_prompts: int = Field(20, ge=0, description="training examples to also check (recall of what was taught)")
    max_new_tokens: int = Field(128, ge=1)
    generate: bool = Field(
        True,
        description="false: nothing answers in PyTorch (eval gives only the held-out loss, export does not ask the "
        "merged model); the exported files answer the prompt set in llama.cpp under the same gates (the loop's "
        "cycles, whose training stops once its examples are learned)",
    )
    min_stop_rate: float = Field(1.0, ge=0.0, le=1.0, description="gate: share of answers ending on the stop token")
    min_non_empty_rate: float = Field(1.0, ge=0.0, le=1.0, description="gate: share of answers with visible text")
    max_loop_rate: float = Field(0.0, ge=0.0, le=1.0, description="gate: share of answers allowed to repeat")
    max_leak_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="gate: share of answers allowed to contain template text"
    )
    min_exact_match: float | None = Field(None, ge=0.0, le=1.0)
    min_recall: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="gate: share of the eval.train_prompts taught prompts answered right (null: 0.8 for SFT, off "
        "for dpo/kto, which are not trained to repeat their answers)",
    )
    min_recall_f1: float | None = Field(
        None, ge=0.0, le=1.0, description="gate: mean token F1 on the eval.train_prompts examples"
    )

    def recall_gate(self, objective: Objective) -> float | None:
        """The recall gate in force: eval.min_recall, else DEFAULT_MIN_RECALL for an SFT run."""
        if self.min_recall is not None:
            return self.min_recall
        return DEFAULT_MIN_RECALL if objective == "sft" else None


class ExportSection(Section):
    quants: list[Quant] = Field(default_factory=lambda: ["Q4_K_M"])
    outtype: OutType = "f16"
    merge: bool = Field(True, description="false: only the adapter, as a LoRA GGUF (--no-merge)")
    max_kl_divergence: float | None = Field(
        0.2,
        gt=0.0,
        le=10.0,
        description="gate: mean KL divergence of each quant's next-token distributions from the f16 GGUF's, "
        "on the eval answers (null: measured, not gated)",
    )


class DeploySection(Section):
    target: Literal["ollama", "lmstudio", "llamacpp", "none"] = "ollama"
    name: str | None = Field(None, description="model name at the target (default: run.name)")
    quant: Quant | OutType | None = Field(
        None, description="which exported GGUF to deploy (default: the first of export.quants)"
    )
    num_ctx: int | None = Field(
        None,
        ge=256,
        description="context length (default: the longest trained conversation plus the answer budget, "
        "rounded up to a multiple of 256)",
    )
    host: str | None = Field(None, description="Ollama address (default: OLLAMA_HOST, else 127.0.0.1:11434)")
    parameters: dict[str, float | int] = Field(
        default_factory=dict, description="Modelfile PARAMETERs, e.g. temperature"
    )
    messages: list[dict[str, str]] = Field(default_factory=list, description="few-shot MESSAGE lines (role, content)")
    smoke_prompts: int = Field(10, ge=0, description="eval prompts the deployed model must answer like the GGUF")
    lmstudio_dir: Path | None = Field(None, description="LM Studio models folder (default: ~/.lmstudio/models)")


class RouteSection(Section):
    primary: str = Field(..., description="champion, v<N> (a loop version) or ollama:<model>")
    fallbacks: list[str] = Field(default_factory=list, description="tried in order when the primary fails")


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
LOOPBACK_ORIGINS = ["http://localhost", "http://127.0.0.1", "http://[::1]"]


class ServeSection(Section):
    api_key: str | None = Field(None, description="the admin key (every endpoint and page); env TUNESHIP_API_KEY")
    client_keys_file: Path | None = Field(
        None, description="file of `name:key` lines: client keys that may chat, list models and send feedback"
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS),
        description="Host names answered (`name` any port, `name:port`, `*`); the address a request came to too",
    )
    allowed_origins: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_ORIGINS),
        description="browser Origins allowed (`scheme://host` any port, with `:port`, `*`); same-origin always",
    )
    backend: Literal["llamacpp", "ollama"] = Field("llamacpp", description="what answers for the champion")
    routes: dict[str, RouteSection] = Field(
        default_factory=dict, description="model name -> {primary, fallbacks}; default: run.name -> champion"
    )
    timeout: float = Field(120.0, gt=0, description="seconds a backend may take before the next one is tried")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_messages: int = Field(64, ge=1, description="most messages in one chat request")
    max_tokens: int = Field(512, ge=1, description="upper bound (and default) for a request's max_tokens")
    n_ctx: int = Field(2048, ge=256, description="llama.cpp context length")
    trigger_every: float = Field(30.0, ge=0, description="seconds between trigger checks while serving (0: off)")
    standby_cycle: bool = Field(
        True,
        description="with the trigger on, keep the next cycle's process started with its libraries imported "
        "(about 7 s saved per cycle on 2 cores; about 500 MB of memory while it waits)",
    )
    cycles: Literal["local", "external"] = Field(
        "local",
        description="local: this server starts the loop's cycles; external: it never does, a `tuneship loop worker` "
        "(any machine that reaches the store) runs them",
    )
    sync_seconds: float = Field(
        5.0, gt=0, description="seconds between this server's look at the champion and its heartbeat row (replicas)"
    )
    db_timeout: float = Field(
        5.0, gt=0, description="seconds a request waits for the loop's database (lock, connection); then 503"
    )
    keep_alive_seconds: float = Field(
        75.0,
        gt=0,
        description="seconds an idle HTTP connection stays open: above a load balancer's or proxy's idle timeout "
        "(AWS ALB and nginx: 60 s), so the balancer closes idle connections first and never sends a request on one "
        "this server just closed (a 502)",
    )
    max_concurrent: int = Field(
        1, ge=1, description="generations at once per model (llama.cpp in-process runs one at a time per model)"
    )
    feedback_per_minute: int = Field(
        60, ge=1, description="feedback a client may send per minute; beyond it 429 + Retry-After"
    )
    max_queue: int = Field(16, ge=0, description="chats waiting for their turn per model; beyond it 429 + Retry-After")
    max_loaded_models: int = Field(
        2, ge=0, description="versions kept loaded besides the champion and routes' targets (least recently used go)"
    )

    def admin_key(self) -> str | None:
        """serve.api_key, else the environment's TUNESHIP_API_KEY; None: no admin key."""
        import os

        return self.api_key or os.environ.get("TUNESHIP_API_KEY") or None


class LoopSection(Section):
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<run.dir>/tuneship.db")
    artifacts_url: str | None = Field(
        None,
        pattern=r"^s3://[^/]+(/.*)?$",
        description="s3://bucket/prefix: versions' served files go there with their sha256 in the registry, for "
        "replicas on other machines (client settings: data.s3); null: local disk only",
    )
    min_examples: int = Field(50, ge=1, description="new accepted examples that trigger a cycle")
    window: str | None = Field(
        None, pattern=r"^\d\d:\d\d-\d\d:\d\d$", description='automatic cycles only inside "HH:MM-HH:MM" (UTC)'
    )
    review: Literal["conflicts", "auto", "required"] = Field(
        "conflicts",
        description="conflicts: an example contradicting a taught or golden fact waits for approval; required: "
        "every new example waits; auto: none waits",
    )
    replay_ratio: float = Field(1.0, ge=0.0, description="earlier examples replayed per new example")
    min_replay: int = Field(100, ge=0, description="at least this many earlier examples replayed (all, when fewer)")
    golden: Path | None = Field(None, description="JSONL of extra golden examples, never trained on")
    max_regression: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="gate: share of the golden/replay prompts the champion answers right that may regress",
    )
    similarity_tolerance: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="gate: F1 a long answer the champion gives right may lose before it counts as regressed",
    )
    min_learned: float = Field(0.8, ge=0.0, le=1.0, description="gate: share of the new examples answered right")
    distrust_after: int = Field(
        3, ge=1, description="a client whose examples were blamed or rejected this often: its feedback waits for review"
    )
    max_blame_cycles: int = Field(
        2, ge=1, description="rejected cycles an example may be in before it waits for review"
    )
    objective: Objective = Field(
        "sft", description="what a cycle trains on: sft, dpo or kto examples (train.objective)"
    )
    lease_seconds: float = Field(300.0, gt=0, description="a cycle's lease; a crashed worker loses it after this")
    backoff_seconds: float = Field(900.0, ge=0, description="no automatic cycle this long after a failed one")
    smoke_prompts: int = Field(3, ge=1, description="golden prompts the live endpoint must answer after a promotion")
    fast_path: bool = Field(
        True, description="below min_examples, gate a few-shot candidate (the newest corrections as example turns)"
    )
    fast_path_budget: int = Field(1024, ge=1, description="most tokens the few-shot turns may take in a prompt")
    min_golden: int = Field(
        5, ge=0, description="fewer accepted golden examples than this: a warning in loop status, serve and Loop page"
    )
    train_layers: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="train.train_layers in a fine-tune cycle; null: 0.5 in adapter format (the LoRA of the top half "
        "of the layers trains on from the champion's adapter, the rest stays the champion's, and steps and checks "
        "run the top half only), 1.0 in merged format (half the layers' delta, merged and quantized, flipped a "
        "learned answer on the quant)",
    )
    version_format: Literal["adapter", "merged"] = Field(
        "adapter",
        description="adapter: a version is its LoRA GGUF, applied at run time on the base model's quantized GGUF "
        "(loaded once); merged: a version is a merged, quantized GGUF of its own",
    )
    keep_versions: int = Field(
        5, ge=1, description="retired/rejected/failed versions that keep their checkpoints, merged model and GGUF"
    )
    keep_generations_days: int | None = Field(
        None, ge=1, description="`tuneship loop prune` deletes processed generations older than this; null: keep"
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_golden_ratio(cls, data: Any) -> Any:
        """loop.golden_ratio (a share of users' corrections held out as golden, so never learned) was removed;
        a config.yaml saved by an older run still carries it and is read without it."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "golden_ratio"}
        return data


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    chat: ChatSection = Field(default_factory=ChatSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)
    deploy: DeploySection = Field(default_factory=DeploySection)
    serve: ServeSection = Field(default_factory=ServeSection)
    loop: LoopSection = Field(default_factory=LoopSection)

    @property
    def run_dir(self) -> Path:
        return self.run.dir / self.run.name


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply `key.path=value` overrides, validate.

    Relative paths in the file (`data.sources`, `run.dir`, ...) are resolved against the file's
    folder, so a config works from any working directory.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
        _resolve_relative_paths(raw, path.parent)
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, path)) from None


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but usually wrong, worded for a person."""
    warnings = []
    low, high = LEARNING_RATE_USUAL
    if not low <= cfg.train.learning_rate <= high:
        warnings.append(
            f"train.learning_rate={cfg.train.learning_rate:g} is outside the usual LoRA range "
            f"[{low:g}, {high:g}]; expect {'slow learning' if cfg.train.learning_rate < low else 'instability'}"
        )
    if cfg.lora.alpha < cfg.lora.r:
        warnings.append(f"lora.alpha={cfg.lora.alpha} is below lora.r={cfg.lora.r}: the adapter is scaled down")
    if cfg.model.train_on_quant and cfg.export.merge:
        warnings.append(
            f"model.train_on_quant={cfg.model.train_on_quant} with export.merge: true: the adapter is merged into "
            "the quant's dequantized weights and quantized again; set export.merge: false to serve it on the base quant"
        )
    return warnings


SECRET_KEYS = (("serve", "api_key"),)  # never written to a run's config.yaml (a `--set` key stays out of it)


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as YAML, without the secrets (SECRET_KEYS)."""
    data = cfg.model_dump(mode="json")
    for section, key in SECRET_KEYS:
        data[section][key] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file (see examples/quickstart.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (run, model, data, ...)")
    return raw


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    def resolve(value: str) -> str:
        if "://" in value or Path(value).is_absolute():
            return value
        return str((base / value).resolve())

    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("sources"), list):
        data["sources"] = [resolve(s) if isinstance(s, str) else s for s in data["sources"]]
    paths = (("run", "dir"), ("eval", "prompts"), ("model", "adapter_from"), ("loop", "golden"))
    for section, key in (*paths, ("serve", "client_keys_file")):
        block = raw.get(section)
        if isinstance(block, dict) and isinstance(block.get(key), str):
            block[key] = resolve(block[key])
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("base"), str):
        candidate = base / model["base"]
        if candidate.exists():
            model["base"] = str(candidate.resolve())


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value`; the value is parsed as YAML (`[1, 2]`, `true`, `1e-4`, strings)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({exc})") from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 1e-4 as a string
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    lines = [f"{where}invalid config:"]
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the config reference in README.md)"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)
