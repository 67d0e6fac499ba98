"""Description generation: the chat-completions backend against a local HTTP server, the local
causal-LM backend on a tiny model, the template fallback, the driver and the CLI."""

from __future__ import annotations

import http.server
import json
import socket
import time
from pathlib import Path

import pytest
from local_http import LocalHTTPServer

from roc_jax.labels import descriptions as D
from roc_jax.labels import generate as G
from roc_jax.labels.__main__ import main as cli_main

# --------------------------------------------------------------------------- fake endpoint


class FakeChatServer:
    """A chat-completions endpoint on 127.0.0.1 that plays scripted responses in order.

    Each script item: ``("ok", content)`` -> 200 with a completion whose message content is
    ``content``; ``(status, body)`` -> that HTTP status and raw body; ``("raw", body)`` -> 200 with
    a raw body; ``("sleep", seconds)`` -> answers 200 after sleeping. The last item repeats.
    """

    def __init__(self):
        self.script: list[tuple] = [("ok", "[]")]
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body,
                                        "auth": self.headers.get("Authorization")})
                i = min(len(server.requests) - 1, len(server.script) - 1)
                kind, value, *rest = server.script[i]
                headers = rest[0] if rest else {}
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "ok", '["late"]'
                if kind == "ok":
                    status, payload = 200, json.dumps(
                        {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": value}}]}
                    ).encode()
                elif kind == "raw":
                    status, payload = 200, value.encode()
                else:
                    status, payload = kind, value.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self._http = LocalHTTPServer(Handler, "/v1")
        self.url = self._http.url

    def close(self):
        self._http.close()


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


def _backend(url: str, sleeps: list, **kw) -> G.OpenAIChatBackend:
    kw.setdefault("max_retries", 3)
    return G.OpenAIChatBackend(url, "test-model", "sk-test", backoff=0.001, max_backoff=0.01,
                               sleep=sleeps.append, **kw)


REPLY = json.dumps(["The head is a person who belongs to the tail organization.",
                    "The tail organization counts the head person as a member.",
                    "The head person plays for or works for the tail organization."])


def test_chat_backend_speaks_the_protocol(server):
    server.script = [("ok", REPLY)]
    sleeps: list = []
    backend = _backend(server.url, sleeps)
    msgs = G.build_messages("/per/org/member_of", 3)
    assert G.parse_reply(backend.complete(msgs), 3, "x") == json.loads(REPLY)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "test-model"
    assert req["body"]["temperature"] == 0
    assert req["body"]["messages"] == msgs
    assert "head type 'per' (a person), tail type 'org'" in msgs[1]["content"]
    assert sleeps == [] and backend.calls == 1


def test_5xx_retried_with_exponential_backoff(server):
    server.script = [(500, "boom"), (502, "bad gateway"), (503, "busy"), ("ok", REPLY)]
    sleeps: list = []
    backend = _backend(server.url, sleeps, max_retries=3)
    assert backend.complete([{"role": "user", "content": "x"}]) == REPLY
    assert backend.calls == 4 and len(sleeps) == 3
    # backoff * 2**attempt, jittered into [0.5, 1] of that, capped at max_backoff.
    assert 0.0005 <= sleeps[0] <= 0.001
    assert 0.001 <= sleeps[1] <= 0.002
    assert 0.002 <= sleeps[2] <= 0.004


def test_429_retried_honouring_retry_after(server):
    server.script = [(429, "slow down", {"Retry-After": "0.005"}), ("ok", REPLY)]
    sleeps: list = []
    backend = _backend(server.url, sleeps)
    assert backend.complete([{"role": "user", "content": "x"}]) == REPLY
    assert sleeps == [0.005]


@pytest.mark.parametrize("status", [400, 401, 404])
def test_4xx_not_retried(server, status):
    server.script = [(status, '{"error": "nope"}'), ("ok", REPLY)]
    sleeps: list = []
    backend = _backend(server.url, sleeps)
    with pytest.raises(G.GenerationError, match=rf"HTTP {status} .*nope.*\(not retried\)"):
        backend.complete([{"role": "user", "content": "x"}])
    assert backend.calls == 1 and sleeps == []


def test_retries_are_bounded(server):
    server.script = [(503, "down for maintenance")]
    sleeps: list = []
    backend = _backend(server.url, sleeps, max_retries=2)
    with pytest.raises(G.GenerationError,
                       match=r"HTTP 503 .*down for maintenance; gave up after 3 attempts"):
        backend.complete([{"role": "user", "content": "x"}])
    assert backend.calls == 3 and len(sleeps) == 2 and len(server.requests) == 3


def test_timeout_retried_then_fails(server):
    server.script = [("sleep", 1.0)]
    sleeps: list = []
    backend = _backend(server.url, sleeps, max_retries=1, timeout=0.2)
    with pytest.raises(G.GenerationError, match=r"timed out after 0.2 s.*gave up after 2 attempts"):
        backend.complete([{"role": "user", "content": "x"}])
    assert backend.calls == 2 and len(sleeps) == 1


def test_endpoint_down():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list = []
    backend = _backend(f"http://127.0.0.1:{port}/v1", sleeps, max_retries=2)
    with pytest.raises(G.GenerationError, match=r"cannot reach the endpoint .*gave up after 3"):
        backend.complete([{"role": "user", "content": "x"}])
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    "script, message",
    [
        (("raw", "<html>oops</html>"), r"not a chat completion"),
        (("raw", '{"choices": []}'), r"not a chat completion"),
        (("ok", ""), r"relation 'r': the model returned an empty reply"),
        (("ok", "Sure! Here are some descriptions: 1. ..."), r"reply is not a JSON list"),
        (("ok", '{"descriptions": ["a"]}'), r"expected a JSON list of strings, got dict"),
        (("ok", "[]"), r"the model returned an empty list"),
        (("ok", '["a", 3, "c"]'), r"every item must be a non-empty string, got 3"),
        (("ok", '["a", "  ", "c"]'), r"every item must be a non-empty string"),
        (("ok", '["a", "b"]'), r"expected 3 distinct descriptions, the reply has 2"),
        (("ok", '["a", "a", "b"]'), r"expected 3 distinct descriptions, the reply has 2"),
    ],
)
def test_malformed_output_raises_clear_error(server, script, message):
    server.script = [script]
    backend = _backend(server.url, [])
    with pytest.raises(G.GenerationError, match=message):
        G.parse_reply(backend.complete([{"role": "user", "content": "x"}]), 3, "r")
    assert backend.calls == 1  # a malformed answer is not an HTTP failure: no retry


def test_code_fences_stripped_and_extra_items_cut():
    fenced = '```json\n["one", "two", "three", "four"]\n```'
    assert G.parse_reply(fenced, 3, "r") == ["one", "two", "three"]
    assert G.parse_reply('```\n["a  b", "c"]\n```', 2, "r") == ["a b", "c"]
    chatter = 'Here you go:\n["x", "y"]\nHope this helps! [1]'
    assert G.parse_reply(chatter, 2, "r") == ["x", "y"]


def test_generate_writes_once_with_prompts(server, tmp_path):
    replies = [json.dumps([f"The head and the tail: {n} {i}." for i in range(5)])
               for n in ("a", "b")]
    server.script = [("ok", replies[0]), ("ok", replies[1])]
    out = tmp_path / "desc.json"
    dfile = G.generate_descriptions(["/x/y/a", "b"], _backend(server.url, []), out, k=5,
                                    context={"b": "In this data, b means ..."})
    assert out.exists()
    back = D.read_descriptions_file(out)
    assert back.texts() == dfile.texts()
    assert back.texts()["b"] == json.loads(replies[1])
    entry = back.relations["b"]
    assert entry.extra["backend"] == "openai" and entry.extra["raw_reply"] == replies[1]
    assert entry.extra["prompt"][1]["content"].endswith("In this data, b means ...")
    assert back.meta["model"] == "test-model" and back.meta["temperature"] == 0
    assert "NOT REVIEWED" in back.meta["review"] and "sk-test" not in out.read_text()
    assert D.load_descriptions(out, ["/x/y/a", "b"])["/x/y/a"][0] == "The head and the tail: a 0."
    with pytest.raises(FileExistsError, match="exists"):
        G.generate_descriptions(["a"], _backend(server.url, []), out)


def test_generate_leaves_no_partial_file(server, tmp_path):
    good = json.dumps([f"d{i}" for i in range(5)])
    server.script = [("ok", good), ("ok", "not json at all"), ("ok", good)]
    out = tmp_path / "desc.json"
    with pytest.raises(G.GenerationError, match=r"relation 'b': the reply is not a JSON list"):
        G.generate_descriptions(["a", "b", "c"], _backend(server.url, []), out)
    server.script = [(500, "x")]
    server.requests.clear()
    with pytest.raises(G.GenerationError, match=r"relation 'a': .*HTTP 500"):
        G.generate_descriptions(["a", "b"], _backend(server.url, [], max_retries=1), out)
    assert list(tmp_path.iterdir()) == []


def test_generate_rejects_bad_label_sets(tmp_path):
    backend = G.TemplateBackend()
    with pytest.raises(D.DescriptionsError, match="duplicate relation name 'a'"):
        G.generate_descriptions(["a", "a"], backend, tmp_path / "o.json")
    with pytest.raises(D.DescriptionsError, match="label set is empty"):
        G.generate_descriptions([], backend, tmp_path / "o.json")
    with pytest.raises(G.GenerationError, match=r"context given for relation\(s\) \['z'\]"):
        G.generate_descriptions(["a"], backend, tmp_path / "o.json", context={"z": "?"})
    assert list(tmp_path.iterdir()) == []


def test_from_env(monkeypatch):
    env = {"OPENAI_BASE_URL": "http://h:1/v1", "ROC_LLM_MODEL": "m", "OPENAI_API_KEY": "k"}
    b = G.OpenAIChatBackend.from_env(env)
    assert (b.base_url, b.model, b.api_key) == ("http://h:1/v1", "m", "k")
    env["ROC_LLM_BASE_URL"] = "http://roc:2/v1/"
    assert G.OpenAIChatBackend.from_env(env).base_url == "http://roc:2/v1"
    assert G.OpenAIChatBackend.from_env(env, model="other").model == "other"
    with pytest.raises(G.GenerationError, match="no endpoint: set ROC_LLM_BASE_URL"):
        G.OpenAIChatBackend.from_env({"ROC_LLM_MODEL": "m"})
    with pytest.raises(G.GenerationError, match="no model name: set ROC_LLM_MODEL"):
        G.OpenAIChatBackend.from_env({"ROC_LLM_BASE_URL": "http://h"})


def test_template_backend_is_marked(tmp_path):
    out = tmp_path / "t.json"
    dfile = G.generate_descriptions(["None", "/per/org/member_of", "founded_by"],
                                    G.TemplateBackend(), out, k=5)
    texts = dfile.texts()
    assert texts["/per/org/member_of"][0] == (
        "The head entity, a person, and the tail entity, an organization, are linked by the "
        "relation 'member of'.")
    assert texts["None"][0] == "There is no relation between the head entity and the tail entity."
    assert "'founded by'" in texts["founded_by"][1]
    back = D.read_descriptions_file(out)
    assert back.meta["backend"] == "template" and "TEMPLATE FALLBACK" in back.meta["note"]
    assert all(e.extra["backend"] == "template" for e in back.relations.values())
    assert "backend: template" in D.format_for_review(back)


def test_cli_generate_against_the_server(server, tmp_path, monkeypatch, capsys):
    labels = tmp_path / "rel2id.json"
    labels.write_text(json.dumps({"None": 0, "/per/org/member_of": 1}))
    server.script = [("ok", json.dumps([f"head/tail {i}" for i in range(4)]))]
    monkeypatch.setenv("ROC_LLM_BASE_URL", server.url)
    monkeypatch.setenv("ROC_LLM_MODEL", "env-model")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "gen.json"
    argv = ["generate", "--labels", str(labels), "--backend", "openai", "--out", str(out),
            "--k", "4"]
    assert cli_main(argv) == 0
    assert f"review it with: python -m roc_jax.labels show {out}" in capsys.readouterr().out
    assert server.requests[0]["body"]["model"] == "env-model"
    assert server.requests[0]["auth"] is None
    assert D.read_descriptions_file(out).meta["labels_file"] == str(labels)
    assert cli_main(argv) == 1  # written once: no silent overwrite
    assert "exists" in capsys.readouterr().err
    server.script = [(401, "bad key")]
    assert cli_main(argv[:-2] + ["--k", "4", "--overwrite"]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert D.read_descriptions_file(out).texts()["None"][0] == "head/tail 0"  # old file intact


# --------------------------------------------------------------------------- local causal LM

LOCAL_REPLY = '["The head person is a member of the tail team .", ' \
              '"The tail team has the head person as a player ."]'


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer GPT-2 and an offline WordLevel tokenizer, saved to a folder.

    The vocabulary is built from the words of the prompt and of LOCAL_REPLY, so that a model can
    be taught (below) to answer that prompt with LOCAL_REPLY.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    pre = pre_tokenizers.Whitespace()
    text = G.SYSTEM_PROMPT + " " + G.USER_PROMPT + " " + LOCAL_REPLY + " user assistant"
    text += " " + " ".join(G.build_messages("/per/org/member_of", 2)[1]["content"].split())
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                     eos_token="[EOS]")
    hf_tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=2, eos_token_id=2, pad_token_id=1)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def test_local_lm_plumbing_and_gibberish_is_rejected(tiny_lm, tmp_path):
    backend = G.LocalLMBackend(tiny_lm, max_new_tokens=12)
    msgs = G.build_messages("/per/org/member_of", 2)
    reply = backend.complete(msgs)
    assert isinstance(reply, str)
    assert reply == backend.complete(msgs)  # greedy: deterministic
    # An untrained model writes gibberish: the driver refuses it with a clear error, no file.
    with pytest.raises(G.GenerationError,
                       match=r"relation '/per/org/member_of': (the reply is not a JSON list|"
                             r"the model returned an empty reply|expected a JSON list)"):
        G.generate_descriptions(["/per/org/member_of"], backend, tmp_path / "o.json", k=2)
    assert list(tmp_path.iterdir()) == []
    assert backend.describe()["decoding"] == "greedy"


def test_local_lm_taught_to_answer_produces_a_descriptions_file(tiny_lm, tmp_path):
    """Honest valid output: the tiny model is first overfitted (a few hundred Adam steps) on this
    one prompt -> LOCAL_REPLY, then greedy decoding through the backend must reproduce it."""
    import torch

    backend = G.LocalLMBackend(tiny_lm, max_new_tokens=40)
    msgs = G.build_messages("/per/org/member_of", 2)
    prompt_ids = backend.tokenizer(backend.prompt_text(msgs))["input_ids"]
    reply_ids = backend.tokenizer(LOCAL_REPLY)["input_ids"] + [backend.tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + reply_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100  # learn the answer only
    model = backend.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-layer model: threads only contend with each other
    try:
        for _ in range(300):
            out = model(input_ids=ids, labels=labels)
            pred = out.logits[0, len(prompt_ids) - 1 : -1].argmax(-1)
            # Stop once every answer token (EOS included) is the confident argmax.
            if bool((pred == ids[0, len(prompt_ids):]).all()) and out.loss.item() < 0.05:
                break
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert out.loss.item() < 0.05, "the tiny model did not learn the answer"
    model.eval()
    out = tmp_path / "local.json"
    dfile = G.generate_descriptions(["/per/org/member_of"], backend, out, k=2)
    assert dfile.texts()["/per/org/member_of"] == [
        # WordLevel decoding joins tokens with spaces; parse_reply normalises the whitespace.
        "The head person is a member of the tail team .",
        "The tail team has the head person as a player .",
    ]
    assert D.read_descriptions_file(out).meta["backend"] == "local"


def test_cli_generate_template_and_local_without_folder(tmp_path, capsys):
    labels = tmp_path / "rel2id.json"
    labels.write_text(json.dumps({"None": 0, "/org/loc/locate_at": 1}))
    out = tmp_path / "t.json"
    assert cli_main(["generate", "--labels", str(labels), "--backend", "template",
                     "--out", str(out)]) == 0
    assert D.load_descriptions(out, ["None", "/org/loc/locate_at"])["/org/loc/locate_at"][1] == (
        "The relation between the head (an organization) and the tail (a location) is "
        "'locate at'.")
    assert cli_main(["generate", "--labels", str(labels), "--backend", "local",
                     "--out", str(tmp_path / "l.json")]) == 1
    assert "--backend local needs --model-path DIR" in capsys.readouterr().err
    assert cli_main(["generate", "--labels", str(labels), "--backend", "local", "--model-path",
                     str(tmp_path / "nowhere"), "--out", str(tmp_path / "l.json")]) == 1
    assert "local model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "l.json").exists()
