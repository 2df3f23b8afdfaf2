"""Property-based fuzzing of the running server from its own /openapi.json (schemathesis):
valid and invalid requests for every operation, at least 200 cases, never a 5xx.

The engine is real (a 1-layer tiny model) with its context cut to a few dozen tokens so that
every generated request finishes in milliseconds."""

from __future__ import annotations

import collections

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.api_helpers import local_engine, serve  # noqa: E402
from tests.conftest import tiny_model_dir  # noqa: E402

# (positive + negative) cases per operation: the POST routes carry nearly all of the input
CASES_WITH_BODY, CASES_WITHOUT_BODY = 60, 10
MIN_CASES = 200
MAX_CONTEXT = 40  # tokens; bounds every generation in this test


@pytest.fixture(scope="module")
def server():
    engine = local_engine(tiny_model_dir("tiny-llama", layers=1), max_context=MAX_CONTEXT)  # --max-context
    try:
        with serve(engine) as u:
            yield u, engine.model_name
    finally:
        engine.shutdown()


def test_generated_requests_never_get_a_server_error(server):
    url, model_name = server
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/responses",
        "GET /v1/models",
        "GET /health",
    }
    seen: list[tuple[str, int]] = []
    failures: list[str] = []

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=CASES_WITH_BODY if op.method == "post" else CASES_WITHOUT_BODY,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
            )
            def run(case):
                if mode is GenerationMode.POSITIVE:  # reach the engine, not only the 404
                    if isinstance(case.body, dict) and "model" in case.body:
                        case.body["model"] = model_name
                    if case.path_parameters and "model_id" in case.path_parameters:
                        case.path_parameters["model_id"] = model_name
                response = case.call(base_url=url, timeout=30)
                seen.append((op.path, response.status_code))
                ctype = str(response.headers.get("content-type", ""))  # str or [str]
                in_band = "text/event-stream" in ctype and any(
                    mark in response.text for mark in ('data: {"error"', '"type": "response.failed"')
                )
                if response.status_code >= 500 or in_band:
                    failures.append(
                        f"{case.method} {case.path} body={case.body!r} -> {response.status_code} {response.text[:200]}"
                    )

            try:
                run()
            except Unsatisfiable:
                # e.g. GET /health: no parameters, so no invalid request exists
                assert mode is GenerationMode.NEGATIVE, f"no valid case for {op.path}"

    assert not failures, "\n".join(failures[:10])
    assert len(seen) >= MIN_CASES, f"only {len(seen)} cases were generated"
    print(f"{len(seen)} cases:", sorted(collections.Counter(seen).items()))
    # the fuzzing reached the engine, not only the validators
    assert any(path.endswith("completions") and status == 200 for path, status in seen)
