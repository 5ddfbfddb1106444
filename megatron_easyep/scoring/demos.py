"""Demonstrations: JSONL files -> token ids with a domain, in a deterministic order.

Accepted lines (one JSON object each, optional "domain" field):
  {"input_ids": [...]}                       already tokenised, used as is
  {"prompt": "...", "response": "..."}       one user turn and the model's answer
  {"messages": [{"role": ..., "content": ...}, ...]}
Text is formatted with the checkpoint's chat template (tokenizer_config.json), or DeepSeek's
`<｜User｜>{prompt}<｜Assistant｜>{response}<｜end▁of▁sentence｜>` when it has none, and tokenised
with the checkpoint's tokenizer.json.

Length rule: a demonstration longer than max_length tokens keeps its first max_length tokens
(prompt first, then as much of the response as fits); the number of dropped tokens is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_easyep.checkpoint.deepseek import ASSISTANT_TOKEN, EOS_TOKEN, USER_TOKEN
from megatron_easyep.checkpoint.io import file_sha256  # noqa: F401  (demos_lib.file_sha256: demo provenance)

DEFAULT_DOMAIN = "default"


class DemoError(ValueError):
    """Bad demonstration input; the message names the file and line."""


@dataclass(frozen=True)
class Demo:
    input_ids: tuple[int, ...]
    domain: str
    source: str  # "FILE:LINE"
    truncated_tokens: int = 0


@dataclass(frozen=True)
class DemoFile:
    path: Path
    domain: str | None  # from FILE:DOMAIN

    @staticmethod
    def parse(spec: str) -> "DemoFile":
        """`FILE` or `FILE:DOMAIN` (a path that exists as given wins over the split)."""
        if Path(spec).exists() or ":" not in spec:
            return DemoFile(Path(spec), None)
        path, domain = spec.rsplit(":", 1)
        if not domain:
            raise DemoError(f"{spec}: empty domain after ':'")
        return DemoFile(Path(path), domain)


class ChatFormatter:
    """Formats and tokenises text demonstrations the way the checkpoint expects."""

    def __init__(self, ckpt_dir: str | Path):
        ckpt_dir = Path(ckpt_dir)
        self.tokenizer = None
        self.template = None
        self.bos_token = self.eos_token = None
        tokenizer_file = ckpt_dir / "tokenizer.json"
        if tokenizer_file.exists():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = ckpt_dir / "tokenizer_config.json"
        if config_file.exists():
            config = json.loads(config_file.read_text())
            self.bos_token = _token_text(config.get("bos_token"))
            self.eos_token = _token_text(config.get("eos_token"))
            template = config.get("chat_template")
            if isinstance(template, list):  # named templates: take "default"
                template = next((t["template"] for t in template if t.get("name") == "default"),
                                None)
            if template:
                import jinja2

                env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise_template_error
                self.template = env.from_string(template)

    def format(self, messages: list[dict]) -> str:
        if self.template is not None:
            return self.template.render(messages=messages, bos_token=self.bos_token or "",
                                        eos_token=self.eos_token or "",
                                        add_generation_prompt=False)
        # DeepSeek's format, no BOS (as the EASY-EP reference scores demonstrations)
        text = []
        for message in messages:
            if message["role"] == "user":
                text.append(USER_TOKEN + message["content"])
            elif message["role"] == "assistant":
                text.append(ASSISTANT_TOKEN + message["content"] + EOS_TOKEN)
            else:
                text.append(message["content"])
        return "".join(text)

    def encode(self, text: str, where: str) -> list[int]:
        if self.tokenizer is None:
            raise DemoError(f"{where}: text demonstration but the checkpoint has no tokenizer.json")
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def _token_text(token):
    if isinstance(token, dict):
        return token.get("content")
    return token


def _raise_template_error(message):
    raise DemoError(f"chat template: {message}")


def _messages_of(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DemoError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        return messages
    if "prompt" in record and "response" in record:
        return [{"role": "user", "content": str(record["prompt"])},
                {"role": "assistant", "content": str(record["response"])}]
    raise DemoError(f"{where}: expected 'input_ids', 'prompt'+'response' or 'messages'")


def load_demos(specs: list[str | DemoFile], ckpt_dir: str | Path, *, vocab_size: int,
               max_length: int | None = None, max_demos: int | None = None) -> list[Demo]:
    """Read every demo file; returns demos grouped by domain (first-seen order), each domain's
    demos in file/line order. `max_demos` keeps the N longest of each domain (ties: earlier
    first), like the EASY-EP reference."""
    formatter = None
    demos: list[Demo] = []
    for spec in specs:
        demo_file = spec if isinstance(spec, DemoFile) else DemoFile.parse(spec)
        if not demo_file.path.is_file():
            raise DemoError(f"demonstration file {demo_file.path} does not exist")
        count = 0
        with open(demo_file.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{demo_file.path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DemoError(f"{where}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DemoError(f"{where}: expected a JSON object")
                domain = record.get("domain") or demo_file.domain or DEFAULT_DOMAIN
                if demo_file.domain and record.get("domain") not in (None, demo_file.domain):
                    raise DemoError(f"{where}: domain {record['domain']!r} contradicts "
                                    f"{demo_file.path}:{demo_file.domain}")
                if "input_ids" in record:
                    ids = record["input_ids"]
                    if not isinstance(ids, list) or not all(
                            isinstance(i, int) and not isinstance(i, bool) for i in ids):
                        raise DemoError(f"{where}: 'input_ids' must be a list of integers")
                else:
                    formatter = formatter or ChatFormatter(ckpt_dir)
                    ids = formatter.encode(formatter.format(_messages_of(record, where)), where)
                if not ids:
                    raise DemoError(f"{where}: empty demonstration")
                bad = [i for i in ids if i < 0 or i >= vocab_size]
                if bad:
                    raise DemoError(f"{where}: token id {bad[0]} is outside the vocabulary "
                                    f"(vocab_size {vocab_size})")
                truncated = 0
                if max_length is not None and len(ids) > max_length:
                    truncated = len(ids) - max_length
                    ids = ids[:max_length]
                demos.append(Demo(tuple(ids), domain, where, truncated))
                count += 1
        if count == 0:
            raise DemoError(f"{demo_file.path}: no demonstrations (empty file)")

    domains = list(dict.fromkeys(d.domain for d in demos))
    ordered = []
    for domain in domains:
        of_domain = [d for d in demos if d.domain == domain]
        if max_demos is not None:
            longest = sorted(range(len(of_domain)), key=lambda i: (-len(of_domain[i].input_ids), i))
            keep = set(longest[:max_demos])
            of_domain = [d for i, d in enumerate(of_domain) if i in keep]
        ordered.extend(of_domain)
    return ordered


def num_steps(num_demos: int, dp_size: int) -> int:
    """Every rank runs the same number of forward steps (EP collectives run in lockstep)."""
    return -(-num_demos // dp_size)
