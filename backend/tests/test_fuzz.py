"""OpenAPI-driven fuzzing of a real `crossmodalseg serve` on 127.0.0.1 (schemathesis, bounded and derandomised).

Every operation of the published schema gets generated requests, valid and invalid: none may answer 5xx, and every
answer must be one the schema documents (status code, content type, body schema). The server holds a real dataset
with a case, so requests that name it reach the deeper code. Afterwards the server still answers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from crossmodalseg.data.phantom import make_phantom_dataset

from .service_harness import Server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 100  # per operation, valid and invalid: about 2,000 requests in all
schemathesis.serializer.alias("application/zip", "application/octet-stream")  # model archives: bytes as they come


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz") / "home"
    srv = Server(home, max_upload_mb=4).start()
    spec = make_phantom_dataset(tmp_path_factory.mktemp("fuzz-data"), n_cases=1, seed=3, size=(24, 24, 16),
                                spacing=(4.0, 4.0, 4.0))
    srv.create_dataset("fuzz")
    srv.upload_case("fuzz", spec.cases[0])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    schema.config.update(base_url=fuzz_server.url)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_5xx_or_an_undocumented_answer(case, fuzz_server: Server):
    case.call_and_validate(checks=CHECKS, timeout=60)


def test_the_server_still_answers_after_the_fuzzing(fuzz_server: Server, tmp_path: Path):
    client: httpx.Client = fuzz_server.client
    for path in ("/health", "/datasets", "/jobs", "/models", "/datasets/fuzz"):
        assert client.get(path).status_code == 200, path
    assert any(d["id"] == "fuzz" for d in client.get("/datasets").json())
