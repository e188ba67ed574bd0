"""The JSON files beside a Hugging Face checkpoint's weights that serving reads.

- ``generation_config.json``: the ids that end a sequence, and the sampling defaults vLLM takes
  from it (``repetition_penalty, temperature, top_k, top_p, min_p``: those that differ from
  transformers' own defaults) for a request that does not set them;
- ``tokenizer_config.json``: the special tokens' text (``bos_token``, ``eos_token``) and the chat
  template, which transformers also keeps in ``chat_template.jinja``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GENERATION_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# transformers' GenerationConfig defaults: a value equal to them is no default of the model's
_HF_DEFAULTS = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


class HFFileError(ValueError):
    pass


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise HFFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise HFFileError(f"{path} must hold a JSON object")
    return data


def id_list(value) -> list[int]:
    """An id or a list of ids (HF's eos_token_id) as a list."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]


@dataclass
class GenerationDefaults:
    eos_token_ids: list[int] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)  # request field -> default value
    engram_cfg: dict | None = None  # TinyEngram's Engram settings (models/tinyengram.py)

    @classmethod
    def read(cls, directory: str | Path) -> GenerationDefaults:
        data = read_json(Path(directory) / GENERATION_FILE)
        sampling = {
            k: data[k]
            for k in SAMPLING_KEYS
            if data.get(k) is not None and data[k] != _HF_DEFAULTS.get(k)
        }
        return cls(id_list(data.get("eos_token_id")), sampling, data.get("engram_cfg"))


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class TokenizerFiles:
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None

    @classmethod
    def read(cls, directory: str | Path) -> TokenizerFiles:
        directory = Path(directory)
        data = read_json(directory / TOKENIZER_CONFIG_FILE)
        template = data.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text()
        return cls(
            _token_text(data.get("bos_token")),
            _token_text(data.get("eos_token")),
            template if isinstance(template, str) else None,
        )
