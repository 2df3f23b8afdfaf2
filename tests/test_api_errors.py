"""Every error of the API has its status and the one OpenAI shape; client disconnects free the
sequence. A real uvicorn server over the real engine; the official openai client and raw HTTP."""

from __future__ import annotations

import json
import socket
import threading

try:  # openai >= 3 ships on httpx2; older clients on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import openai
import pytest

from tests.api_helpers import engine_idle, local_engine, serve, tiny_model, wait_until
from tpi_node.engine.limits import EngineLimits

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = local_engine(model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serve(engine) as u:
        yield u


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"null", b'"text"', b""])
def test_invalid_json_is_400(url, raw):
    r = httpx.post(url + "/v1/chat/completions", content=raw, timeout=10, headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": MSGS}, "model"),
        ({"model": "MODEL"}, "messages"),
        ({"model": "MODEL", "messages": []}, "messages"),
        ({"model": "MODEL", "messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"model": "MODEL", "messages": MSGS, "temperature": 3}, "temperature"),
        ({"model": "MODEL", "messages": MSGS, "top_p": 0}, "top_p"),
        ({"model": "MODEL", "messages": MSGS, "max_tokens": 0}, "max_tokens"),
        ({"model": "MODEL", "messages": MSGS, "n": 0}, "n"),
        ({"model": "MODEL", "messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "MODEL", "messages": MSGS, "seed": 2**70}, "seed"),
        ({"model": "MODEL", "messages": MSGS, "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {
                "model": "MODEL",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
            },
            "messages.0.content.0",
        ),
    ],
)
def test_bad_parameters_are_400(url, engine, body, param):
    if body.get("model") == "MODEL":
        body = {**body, "model": engine.model_name}
    err = assert_error(chat(url, **body), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_bad_completion_prompts_are_400(url, engine):
    for prompt in ([], "", [10**9], [[1, 2], []], [-1]):
        r = httpx.post(
            url + "/v1/completions", timeout=10, json={"model": engine.model_name, "prompt": prompt, "max_tokens": 2}
        )
        assert_error(r, 400)


def test_context_length_exceeded(url, engine):
    r = chat(url, model=engine.model_name, messages=MSGS, max_tokens=engine.max_context)
    err = assert_error(r, 400, "context_length_exceeded")
    assert str(engine.max_context) in err["message"]
    long_prompt = list(range(10, 200)) * (engine.max_context // 190 + 1)
    r = httpx.post(
        url + "/v1/completions", timeout=10, json={"model": engine.model_name, "prompt": long_prompt, "max_tokens": 1}
    )
    assert_error(r, 400, "context_length_exceeded")
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=engine.model_name, messages=MSGS, max_tokens=engine.max_context)
    assert exc.value.code == "context_length_exceeded"


def test_unknown_model_is_404(url):
    assert_error(chat(url, model="gpt-17", messages=MSGS), 404, "model_not_found")
    assert_error(httpx.get(url + "/v1/models/gpt-17"), 404, "model_not_found")
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="x")


def test_unknown_route_and_method_use_the_error_shape(url):
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(url + "/v1/chat/completions"), 405)


def test_api_key_is_checked(engine):
    with serve(engine, api_key="s3cret") as u:
        body = {"model": engine.model_name, "messages": MSGS, "max_tokens": 1}
        assert_error(httpx.post(u + "/v1/chat/completions", json=body), 401, "invalid_api_key")
        assert_error(httpx.post(u + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(u + "/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        # health stays open for probes, but tells nothing about the cluster without the key
        bare = httpx.get(u + "/health")
        assert bare.status_code == 200 and bare.json() == {"status": "ok"}
        full = httpx.get(u + "/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert full["status"] == "ok" and full["model"] == engine.model_name and "nodes" in full
        assert_error(httpx.get(u + "/metrics"), 401, "invalid_api_key")
        metrics = httpx.get(u + "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert metrics.status_code == 200 and "tpi_requests_total" in metrics.text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=u + "/v1", api_key="nope", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=u + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(**body).usage.completion_tokens == 1


def test_public_metrics_opens_only_metrics(engine):
    with serve(engine, api_key="s3cret", public_metrics=True) as u:
        assert httpx.get(u + "/metrics").status_code == 200
        assert_error(httpx.get(u + "/v1/models"), 401, "invalid_api_key")
        assert httpx.get(u + "/health").json() == {"status": "ok"}


def test_not_ready_is_503(model_dir):
    stopped = local_engine(model_dir)
    stopped.shutdown()  # a real engine that is no longer ready
    with serve(stopped) as u:
        assert_error(httpx.get(u + "/health"), 503, "cluster_not_ready")
        assert_error(chat(u, model=stopped.model_name, messages=MSGS), 503, "cluster_not_ready")
        client = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as exc:
            client.completions.create(model=stopped.model_name, prompt="x")
        assert exc.value.status_code == 503


class OpenStream:
    """A streaming chat request held open by the client; close() drops the connection."""

    def __init__(self, u: str, engine, max_tokens: int = 1500) -> None:
        body = {
            "model": engine.model_name,
            "messages": MSGS,
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
        self._cm = httpx.stream("POST", u + "/v1/chat/completions", json=body, timeout=60)
        self.response = self._cm.__enter__()
        assert self.response.status_code == 200
        self.lines = (line for line in self.response.iter_lines() if line)
        assert next(self.lines).startswith("data: ")  # the stream is running

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


@pytest.mark.parametrize("where", ["server", "engine"])
def test_queue_full_is_429(model_dir, where):
    if where == "server":
        eng, kwargs = local_engine(model_dir), {"max_queue": 1}
    else:  # the engine's own bound: one running, one waiting, the next is refused
        eng, kwargs = local_engine(model_dir, EngineLimits(max_running=1, max_queue=1)), {}
    try:
        with serve(eng, **kwargs) as u:
            streams = [OpenStream(u, eng)]
            if where == "engine":
                waiting = threading.Thread(
                    target=chat, args=(u,), kwargs=dict(model=eng.model_name, messages=MSGS, max_tokens=1), daemon=True
                )
                waiting.start()
                wait_until(lambda: eng.stats()["waiting"] == 1, what="a waiting request")
            assert_error(chat(u, model=eng.model_name, messages=MSGS, max_tokens=1), 429, "queue_full")
            client = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=eng.model_name, messages=MSGS, max_tokens=1)
            for s in streams:
                s.close()
            wait_until(lambda: engine_idle(eng), what="the engine to drain")
            assert chat(u, model=eng.model_name, messages=MSGS, max_tokens=1).status_code == 200
    finally:
        eng.shutdown()


def test_streaming_disconnect_cancels_the_sequence(url, engine):
    before = engine.stats()["completion_tokens"]
    stream = OpenStream(url, engine)
    wait_until(lambda: engine.stats()["running"] == 1, what="the sequence to run")
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: engine_idle(engine), what="the sequence to be freed")
    assert engine.stats()["completion_tokens"] - before < 1500
    assert httpx.get(url + "/health").status_code == 200
    assert "tpi_server_sequences_in_flight 0.0" in httpx.get(url + "/metrics").text
    r = chat(url, model=engine.model_name, messages=MSGS, max_tokens=3, temperature=0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_disconnect_cancels_the_sequence(url, engine):
    before = engine.stats()["completion_tokens"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": engine.model_name, "messages": MSGS, "max_tokens": 1500, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        wait_until(lambda: engine.stats()["running"] == 1, what="the sequence to run")
    wait_until(lambda: engine_idle(engine), what="the sequence to be freed")
    assert engine.stats()["completion_tokens"] - before < 1500
    assert httpx.get(url + "/health").status_code == 200


def test_in_band_error_after_the_stream_started(model_dir):
    eng = local_engine(model_dir)
    try:
        with serve(eng) as u:
            stream = OpenStream(u, eng)
            eng.shutdown()  # the engine fails every running sequence
            rest = [line.removeprefix("data: ") for line in stream.lines]
            stream.close()
            assert rest[-1] == "[DONE]"
            err = json.loads(rest[-2])["error"]
            assert err["code"] == "shutdown" and err["type"] == "service_unavailable_error"
            assert all("error" not in json.loads(x) for x in rest[:-2])
    finally:
        eng.shutdown()
