"""Generating relation descriptions for a new label set (MORE, MNRE-1, a user's labels).

Three backends, one interface (``backend.complete(messages) -> str``):

- ``OpenAIChatBackend``: any OpenAI-compatible ``/chat/completions`` endpoint, temperature 0,
  stdlib ``urllib``; 5xx, 429, timeouts and refused connections are retried with bounded
  exponential backoff, other 4xx fail at once.
- ``LocalLMBackend``: a local ``transformers`` causal LM folder, greedy decoding.
- ``TemplateBackend``: no language model; sentences built from the label path
  (``/per/org/member_of`` -> "The head entity, a person, is member of the tail entity, an
  organization."), marked ``"backend": "template"`` in the output so that nobody mistakes them for
  reviewed descriptions.

``generate_descriptions`` asks the backend once per relation, parses the reply (a JSON list of
strings, code fences stripped), keeps the prompt and the raw reply with every relation, and writes
the file once, atomically, only when every relation succeeded.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from roc_jax.labels.descriptions import (
    DescriptionsFile,
    RelationEntry,
    check_names,
    write_descriptions_file,
)

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

SYSTEM_PROMPT = (
    "You write descriptions of relation labels for a relation extraction system that reads social "
    "media posts. Each description is one plain English sentence that says who the head entity "
    "is, who the tail entity is, and what links them. Reply with a JSON list of strings only."
)

USER_PROMPT = (
    "Relation label: {name}\n"
    "{hint}"
    "Write {k} distinct descriptions of this relation. Each must state who the head entity is, "
    "who the tail entity is and what links them, in one sentence. If the label is 'None' (or means "
    "no relation), describe the absence of any relation between the head and the tail.\n"
    'Reply with a JSON list of {k} strings and nothing else, e.g. ["...", "..."].'
)

_TYPE_WORDS = {
    "per": "a person",
    "org": "an organization",
    "loc": "a location",
    "misc": "a thing, event or work",
    "gpe": "a geo-political entity",
    "fac": "a facility",
    "obj": "an object in the image",
}
_NONE_NAMES = {"none", "no_relation", "na", "n/a", "other"}


class GenerationError(RuntimeError):
    """A backend could not produce usable descriptions for a relation."""


class Backend(Protocol):
    """What ``generate_descriptions`` needs from a backend."""

    name: str

    def complete(self, messages: Messages) -> str:
        """The model's reply text to a chat ``messages`` list."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend settings recorded in the file's ``meta`` (never the API key)."""
        ...


def _label_hint(name: str) -> str:
    parts = [p for p in name.strip("/").split("/") if p]
    if len(parts) == 3 and parts[0] in _TYPE_WORDS and parts[1] in _TYPE_WORDS:
        return (
            f"The label's path reads: head type '{parts[0]}' ({_TYPE_WORDS[parts[0]]}), tail type "
            f"'{parts[1]}' ({_TYPE_WORDS[parts[1]]}), relation '{parts[2].replace('_', ' ')}'.\n"
        )
    return ""


def build_messages(name: str, k: int, context: str = "") -> Messages:
    """The chat prompt for one relation (stored verbatim with the output).

    ``context``: optional extra instructions, e.g. a note on what the data means by the label.
    """
    user = USER_PROMPT.format(name=name, k=k, hint=_label_hint(name))
    if context:
        user += "\n" + context.strip()
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def parse_reply(reply: str, k: int, name: str) -> list[str]:
    """A model reply -> exactly ``k`` distinct descriptions.

    The reply must hold a JSON list of non-empty strings: a surrounding code fence is stripped, and
    text before the first ``[`` or after the list is ignored (chat models add such chatter; the raw
    reply is stored with the output for review). More than ``k`` items are cut to the first ``k``;
    fewer, duplicates, or anything else raise ``GenerationError`` quoting the reply.
    """
    if not isinstance(reply, str) or not reply.strip():
        raise GenerationError(f"relation {name!r}: the model returned an empty reply")
    shown = reply if len(reply) <= 300 else reply[:300] + "..."
    text = reply.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    if text.find("[") > 0 and not text.startswith("{"):
        text = text[text.find("["):]
    try:
        items, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as e:
        raise GenerationError(
            f"relation {name!r}: the reply is not a JSON list of strings ({e.msg}): {shown!r}"
        ) from None
    if not isinstance(items, list):
        raise GenerationError(
            f"relation {name!r}: expected a JSON list of strings, got {type(items).__name__}: "
            f"{shown!r}"
        )
    if not items:
        raise GenerationError(f"relation {name!r}: the model returned an empty list")
    bad = [x for x in items if not isinstance(x, str) or not x.strip()]
    if bad:
        raise GenerationError(
            f"relation {name!r}: every item must be a non-empty string, got {bad[0]!r}"
        )
    out: list[str] = []
    for x in items:
        x = " ".join(x.split())
        if x not in out:
            out.append(x)
    if len(out) < k:
        raise GenerationError(
            f"relation {name!r}: expected {k} distinct descriptions, the reply has {len(out)}: "
            f"{shown!r}"
        )
    return out[:k]


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIChatBackend:
    """An OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``).

    Retries (``max_retries`` times, sleeps ``backoff * 2**attempt`` capped at ``max_backoff``, with
    jitter) on: connection refused / unreachable, timeout, HTTP 5xx and 429 (honouring
    ``Retry-After`` up to ``max_backoff``). Other 4xx (bad key, unknown model, bad request) fail
    at once. ``sleep`` is injectable so that tests do not wait.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_tokens: int = 1024,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url:
            raise GenerationError("no endpoint: set ROC_LLM_BASE_URL or OPENAI_BASE_URL (--base-url)")
        if not model:
            raise GenerationError("no model name: set ROC_LLM_MODEL (--model)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_tokens = max_tokens
        self.sleep = sleep
        self.calls = 0  # HTTP attempts made, for tests and logs

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **kwargs: Any) -> OpenAIChatBackend:
        """Reads ``ROC_LLM_BASE_URL`` (or ``OPENAI_BASE_URL``), ``ROC_LLM_MODEL``, ``OPENAI_API_KEY``.

        Explicit ``kwargs`` (``base_url``, ``model``, ``api_key``) win over the environment.
        """
        env = dict(os.environ if env is None else env)
        base_url = kwargs.pop("base_url", None) or env.get("ROC_LLM_BASE_URL") or env.get(
            "OPENAI_BASE_URL"
        )
        model = kwargs.pop("model", None) or env.get("ROC_LLM_MODEL")
        api_key = kwargs.pop("api_key", None) or env.get("OPENAI_API_KEY")
        return cls(base_url or "", model or "", api_key, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "base_url": self.base_url, "model": self.model,
                "temperature": 0}

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff)
            except ValueError:
                pass
        base = min(self.backoff * (2**attempt), self.max_backoff)
        return base * (0.5 + random.random() / 2)  # jitter: concurrent clients do not sync up

    def complete(self, messages: Messages) -> str:
        url = f"{self.base_url}/chat/completions"
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0,
             "max_tokens": self.max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            self.calls += 1
            retry_after = None
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return self._content(raw, url)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code != 429 and e.code < 500:
                    raise GenerationError(f"{url}: {last} (not retried)") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except TimeoutError as e:
                last = f"timed out after {self.timeout} s ({e})"
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    last = f"timed out after {self.timeout} s"
                else:
                    last = f"cannot reach the endpoint ({e.reason})"
            except ConnectionError as e:
                last = f"connection failed ({e})"
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.warning("%s: %s; retry %d/%d in %.2f s", url, last, attempt + 1,
                            self.max_retries, delay)
                self.sleep(delay)
        raise GenerationError(f"{url}: {last}; gave up after {self.max_retries + 1} attempts")

    @staticmethod
    def _content(raw: bytes, url: str) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            shown = raw[:300].decode("utf-8", "replace")
            raise GenerationError(
                f"{url}: the response is not a chat completion "
                f"(no choices[0].message.content): {shown!r}"
            ) from None
        if content is None:
            raise GenerationError(f"{url}: the completion has no content (null)")
        return str(content)


# --------------------------------------------------------------------------- local causal LM


class LocalLMBackend:
    """A local ``transformers`` causal LM folder (``AutoModelForCausalLM`` + ``AutoTokenizer``).

    Greedy decoding (``do_sample=False``); the chat template is used when the tokenizer has one,
    otherwise the messages are joined as plain text. Loads only local files.
    """

    name = "local"

    def __init__(self, path: str | Path, *, max_new_tokens: int = 512, device: str = "cpu"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise GenerationError(f"local model folder not found: {self.path}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise GenerationError(f"{self.path}: cannot load a causal LM and tokenizer ({e})") from e
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": str(self.path), "decoding": "greedy",
                "max_new_tokens": self.max_new_tokens}

    def prompt_text(self, messages: Messages) -> str:
        """The exact text fed to the model."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"

    def complete(self, messages: Messages) -> str:
        import torch

        enc = self.tokenizer(self.prompt_text(messages), return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = eos_id
        extra = {} if eos_id is None else {"eos_token_id": eos_id}  # stop at the tokenizer's EOS
        with torch.no_grad():
            out = self.model.generate(
                **enc, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad_id,
                **extra,
            )
        new = out[0, enc["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------- template fallback


class TemplateBackend:
    """No language model: K sentences from the label path. Output is marked ``template``."""

    name = "template"

    _TEMPLATES = (
        "The head entity, {h}, and the tail entity, {t}, are linked by the relation '{r}'.",
        "The relation between the head ({h}) and the tail ({t}) is '{r}'.",
        "The tail entity, {t}, stands in the relation '{r}' to the head entity, {h}.",
        "The head is {h} and the tail is {t}; what links them is '{r}'.",
        "In the sentence, the head ({h}) has the relation '{r}' with the tail ({t}).",
        "The sentence states that the head entity has the relation '{r}' with the tail entity.",
    )
    _NONE = (
        "There is no relation between the head entity and the tail entity.",
        "The head and the tail are mentioned together but are not related.",
        "The sentence does not link the head entity to the tail entity.",
        "None of the known relations holds between the head and the tail.",
        "The head entity and the tail entity are unrelated.",
        "The text expresses no relation from the head to the tail.",
    )

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name,
                "note": "TEMPLATE FALLBACK: built from the label path, no language model; "
                        "review and rewrite before training"}

    def descriptions(self, name: str, k: int) -> list[str]:
        """``k`` template sentences for ``name`` (at most 6 distinct ones exist)."""
        if k > len(self._TEMPLATES):
            raise GenerationError(f"the template backend has {len(self._TEMPLATES)} templates, "
                                  f"k={k} requested")
        if name.strip().lower() in _NONE_NAMES:
            return list(self._NONE[:k])
        parts = [p for p in name.strip("/").split("/") if p]
        if len(parts) >= 3 and parts[0] in _TYPE_WORDS and parts[1] in _TYPE_WORDS:
            h, t, r = _TYPE_WORDS[parts[0]], _TYPE_WORDS[parts[1]], " ".join(parts[2:])
        else:
            h, t, r = "an entity", "an entity", " ".join(parts) or name
        r = r.replace("_", " ").strip()
        return [tpl.format(h=h, t=t, r=r) for tpl in self._TEMPLATES[:k]]

    def complete(self, messages: Messages) -> str:
        m = re.search(r"Relation label: (.*)\n", messages[-1]["content"])
        k = re.search(r"Write (\d+) distinct", messages[-1]["content"])
        if not m or not k:
            raise GenerationError("template backend: the prompt is not one of build_messages'")
        return json.dumps(self.descriptions(m.group(1), int(k.group(1))))


# --------------------------------------------------------------------------- driver


def generate_descriptions(
    rel_names: Sequence[str],
    backend: Backend,
    out_path: str | Path,
    *,
    k: int = 5,
    context: dict[str, str] | None = None,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
) -> DescriptionsFile:
    """Generates ``k`` descriptions per relation and writes them once to ``out_path``.

    Nothing is written unless every relation succeeded (the first failure raises
    ``GenerationError`` naming the relation). ``context``: optional per-relation extra instructions.
    Every relation records its prompt and the raw reply; ``meta`` records the backend.
    """
    names = check_names(rel_names, source="labels")
    if k < 1:
        raise GenerationError(f"k must be >= 1, got {k}")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        # Checked before the (possibly long, paid) generation, not only at write time.
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) to replace it")
    context = context or {}
    unknown = [n for n in context if n not in set(names)]
    if unknown:
        raise GenerationError(f"context given for relation(s) {unknown} not in the label set")
    relations: dict[str, RelationEntry] = {}
    for i, name in enumerate(names, 1):
        messages = build_messages(name, k, context.get(name, ""))
        log.info("[%d/%d] %s: asking %s", i, len(names), name, backend.name)
        try:
            reply = backend.complete(messages)
        except GenerationError as e:
            raise GenerationError(f"relation {name!r}: {e}") from e
        descs = parse_reply(reply, k, name)
        relations[name] = RelationEntry(
            descs,
            review="",
            extra={"backend": backend.name, "prompt": messages, "raw_reply": reply},
        )
    info = backend.describe()
    file_meta = {
        "written_by": f"roc_jax.labels.generate ({info.get('model', backend.name)})",
        **info,
        "k": k,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "system_prompt": SYSTEM_PROMPT,
        "user_prompt_template": USER_PROMPT,
        "review": "NOT REVIEWED: read every relation (python -m roc_jax.labels show FILE) and "
                  "fill in its 'review' note before training",
        **(meta or {}),
    }
    dfile = DescriptionsFile(meta=file_meta, relations=relations)
    write_descriptions_file(out_path, dfile, overwrite=overwrite)
    return dfile
