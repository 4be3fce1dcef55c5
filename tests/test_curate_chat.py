"""The chat client against the stand-in server: a real HTTP server on 127.0.0.1 that scripts failures."""
import base64
import json
import time
import urllib.request

import pytest

pydantic = pytest.importorskip("pydantic")
pytest.importorskip("openai")

from cultureclip.curate.backends.chat import ChatAnswer, ChatClient, ChatConfig, image_part, strict_json_schema  # noqa: E402
from cultureclip.curate.backends.standin import Fault, StandinServer, request_text  # noqa: E402
from cultureclip.curate.backends.preflight import ChatServerError  # noqa: E402


class Echo(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    word: str
    length: int = pydantic.Field(ge=0)


def echo(body):
    """The answer the tests expect: the last word of the prompt and its length."""
    word = request_text(body).split()[-1]
    return {"word": word, "length": len(word)}


def client_for(server, **kw):
    cfg = dict(base_url=server.url, model="m", timeout_s=2.0, max_attempts=3, backoff_s=0.01, concurrency=4)
    cfg.update(kw)
    return ChatClient(ChatConfig(**cfg))


def ask(client, word):
    return client.ask([{"role": "user", "content": f"say {word}"}], Echo, name="echo")


def test_answer_is_validated_and_schema_sent():
    with StandinServer({"echo": echo}) as server, client_for(server) as client:
        ans = ask(client, "hello")
        assert ans == ChatAnswer(value=Echo(word="hello", length=5), error=None, message="", attempts=1)
        fmt = server.bodies[0]["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "echo"
        assert fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["additionalProperties"] is False
        assert sorted(fmt["json_schema"]["schema"]["required"]) == ["length", "word"]
        assert server.bodies[0]["model"] == "m"
        with urllib.request.urlopen(server.url + "/models", timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == "standin"


@pytest.mark.parametrize("kind,reason", [("503", "http_503"), ("500", "http_500"), ("429", "http_429"),
                                         ("malformed", "malformed_json"), ("schema", "schema_violation")])
def test_fault_retried_then_answered(kind, reason):
    with StandinServer({"echo": echo}, faults=[kind, kind]) as server, client_for(server) as client:
        ans = ask(client, "abc")
        assert ans.ok and ans.value.word == "abc" and ans.attempts == 3
        assert server.requests == 3


@pytest.mark.parametrize("kind,reason", [("503", "http_503"), ("429", "http_429"), ("garbage", "bad_response"),
                                         ("malformed", "malformed_json"), ("schema", "schema_violation")])
def test_fault_every_time_is_an_error_not_a_default(kind, reason):
    with StandinServer({"echo": echo}, faults=lambda i, body: kind) as server, client_for(server) as client:
        ans = ask(client, "abc")
        assert ans.value is None and ans.error == reason and ans.attempts == 3 and ans.message
        assert server.requests == 3  # bounded: max_attempts in all, the SDK adds no hidden retries


def test_timeout_retried_then_error():
    slow = Fault("slow", delay_s=1.5)
    with StandinServer({"echo": echo}, faults=[slow]) as server, client_for(server, timeout_s=0.5) as client:
        t0 = time.monotonic()
        ans = ask(client, "x")
        assert ans.ok and ans.attempts == 2 and 0.5 <= time.monotonic() - t0 < 1.4
    with StandinServer({"echo": echo}, faults=lambda i, b: slow) as server, \
            client_for(server, timeout_s=0.3, max_attempts=2) as client:
        ans = ask(client, "x")
        assert ans.error == "timeout" and ans.attempts == 2 and server.requests == 2


def test_retry_after_is_honoured():
    with StandinServer({"echo": echo}, faults=[Fault("429", retry_after=1)]) as server, \
            client_for(server, backoff_s=0.001) as client:
        ans = ask(client, "x")
        assert ans.ok and ans.attempts == 2
        gap = server.arrivals[1] - server.arrivals[0]
        assert 1.0 <= gap < 1.5, gap  # backoff alone would retry after ~1 ms


def test_client_errors_are_not_retried_and_an_unreachable_server_stops_at_once():
    with StandinServer({"echo": echo}) as server, client_for(server) as client:
        ans = client.ask([{"role": "user", "content": "x y"}], Echo, name="unknown_schema")
        assert ans.error == "http_400" and ans.attempts == 1 and "unknown_schema" in ans.message
    with StandinServer({}) as server:
        url = server.url
    with client_for(type("S", (), {"url": url})(), max_attempts=2) as client:  # nobody listens there now
        start = time.monotonic()
        with pytest.raises(ChatServerError, match=f"cannot reach the chat server {url} \\(model 'm'\\)"):
            ask(client, "x")  # the preflight request: no job is tried, no backoff
        assert time.monotonic() - start < 2.0



def test_ask_many_bounds_concurrency_and_returns_every_key():
    with StandinServer({"echo": echo}, latency_s=0.05) as server, client_for(server, concurrency=3) as client:
        words = [f"w{i}" for i in range(20)]
        out = dict(client.ask_many((w, [{"role": "user", "content": f"say {w}"}], Echo, "echo") for w in words))
        assert sorted(out) == sorted(words)
        assert all(out[w].value.word == w for w in words)
        assert server.max_in_flight == 3  # reached, never exceeded
        assert server.requests == 20


def test_rate_limit_spaces_requests():
    with StandinServer({"echo": echo}) as server, client_for(server, concurrency=8, rate_limit=20) as client:
        list(client.ask_many((i, [{"role": "user", "content": f"say {i}"}], Echo, "echo") for i in range(9)))
        span = server.arrivals[-1] - server.arrivals[0]
        assert span >= 8 / 20 - 0.02, span  # 9 requests at 20/s: 8 intervals of 50 ms


def test_api_key_from_env_used_and_never_in_answers(monkeypatch):
    secret = "sk-test-" + "s3cr3t" * 4
    monkeypatch.setenv("CC_TEST_KEY", secret)
    with StandinServer({"echo": echo}, api_key=secret) as server, \
            client_for(server, api_key_env="CC_TEST_KEY") as client:
        assert ask(client, "x").ok  # the server checked the bearer key
        assert secret not in repr(client) and secret not in repr(client.cfg)
    with StandinServer({"echo": echo}, api_key=secret) as server, \
            client_for(server, api_key_env="CC_TEST_UNSET_KEY") as client:
        with pytest.raises(ChatServerError, match="refused model 'm': HTTP 401: .*invalid API key"):
            ask(client, "x")  # a wrong key stops the run before any job
        assert server.requests == 0
    # a server that echoes the key back in an error must not get it into the answer
    with StandinServer({"echo": lambda body: (_ for _ in ()).throw(RuntimeError(secret))}) as server, \
            client_for(server, api_key_env="CC_TEST_KEY", max_attempts=1) as client:
        ans = ask(client, "x")
        assert ans.error == "http_500" and secret not in ans.message and "***" in ans.message


def test_image_part_and_strict_schema():
    png = b"\x89PNG\r\n\x1a\n" + b"rest"
    part = image_part(png)
    assert part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert image_part(b"\xff\xd8\xff\xe0abc")["image_url"]["url"].startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError, match="unknown image format"):
        image_part(b"not an image")
    schema = strict_json_schema(Echo)
    assert schema["additionalProperties"] is False and set(schema["required"]) == {"word", "length"}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown chat settings"):
        ChatConfig.from_mapping({"base_url": "http://x/v1", "model": "m", "api_key": "leak"})
    with pytest.raises(ValueError, match="concurrency"):
        ChatConfig(base_url="http://x/v1", model="m", concurrency=0)


@pytest.mark.slow
def test_standin_cli_serves_in_another_process():
    import subprocess
    import sys
    from pathlib import Path
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "cultureclip.curate.backends.standin", "--latency", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()  # EOF (not a hang) if the server fails to start
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with ChatClient(ChatConfig(base_url=url, model="m", timeout_s=5, max_attempts=1)) as client:
            ans = client.ask([{"role": "user", "content": "x"}], Echo, name="echo")
        assert ans.error == "http_400" and "judge_scores_v1" in ans.message  # the judge's responders are served
        with urllib.request.urlopen(url + "/standin/stats", timeout=5) as r:
            assert json.load(r)["requests"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_trickling_server_is_cut_off_at_the_total_deadline():
    """One byte every 0.1 s (status line and headers included): every read comes in time, the answer
    would take ~30 s. timeout_s is the whole request's deadline: each try ends at ~1 s, then the next."""
    trickle = Fault("trickle", interval_s=0.1)
    with StandinServer({"echo": echo}, faults=[trickle, trickle]) as server, \
            client_for(server, timeout_s=1.0, max_attempts=2) as client:
        start = time.monotonic()
        ans = ask(client, "slowly")
        took = time.monotonic() - start
        assert ans.error == "timeout" and ans.attempts == 2 and "within 1.0 s" in ans.message
        assert 2.0 <= took < 4.0, took
    with StandinServer({"echo": echo}, faults=[Fault("trickle", interval_s=0.001)]) as server, \
            client_for(server, timeout_s=10.0) as client:  # a trickle that ends in time is an answer
        ans = ask(client, "patient")
        assert ans.ok and ans.value.word == "patient" and ans.attempts == 1


def test_preflight_fails_a_wrong_model_or_path_in_a_second():
    """One tiny request before the first job: a model the server does not serve, or a base_url without
    /v1, stops with the URL, the model and the server's answer; no job request is sent."""
    with StandinServer({"echo": echo}, models=["served-model"]) as server:
        for kw, expected in (({"model": "wrong-model"}, "refused model 'wrong-model': HTTP 404: .*does not exist"),
                             ({"base_url": server.url[:-3], "model": "served-model"}, "HTTP 404: .*no route")):
            start = time.monotonic()
            with client_for(server, **kw) as client, pytest.raises(ChatServerError, match=expected) as info:
                list(client.ask_many((i, [{"role": "user", "content": "say a"}], Echo, "echo") for i in range(50)))
            assert time.monotonic() - start < 1.0 and server.requests == 0
            assert (kw.get("base_url") or server.url) in str(info.value)
        with client_for(server, model="served-model") as client:  # the right model: jobs run, one preflight
            assert all(a.ok for _, a in client.ask_many((i, [{"role": "user", "content": f"say w{i}"}], Echo, "echo")
                                                          for i in range(5)))
        assert server.requests == 5 and server.preflights == 1
