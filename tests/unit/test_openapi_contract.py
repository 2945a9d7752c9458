"""Contract test: schemathesis against the service's own /openapi.json.

The real ingress (middleware, routes, error mapping, post-processing) runs
in-process, built as a replica builds it, around the real stage classes with
sleeping models (tests/stub_stages.py, at zero sleep), so some five hundred
generated requests, valid and invalid, take seconds. Every response must be
one the schema documents: no 5xx, only documented statuses and content
types, 200 bodies (JSON, and each server-sent event of a stream) matching
their models, every request the schema rules out refused, and every error
in OpenAI's envelope.

Not checked: that every request the schema allows is accepted
(positive_data_acceptance). The schema cannot say the family rules
(serve_app/families.py): a size one model serves and another refuses, n > 1
on dall-e-3, transparent with jpeg. Those are documented 400s naming the
parameter, and tests/unit/test_families.py covers them.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import TEST_API_KEY, stub_ingress

# Fuzzed cases per operation (valid and invalid together). The examples and
# coverage phases add their own: the schema's examples, and per field the
# boundary and wrong cases (missing, null, wrong type, out of range, unknown
# enum value).
MAX_EXAMPLES = 150
SEED = 20240601

# (operation, generation mode, status) -> cases, for the summary at the end.
TALLY: Counter[tuple[str, str, str]] = Counter()


@pytest.fixture(scope="module")
def contract_app(app_args):
    """The ingress's ASGI app on stub model stages (conftest's local_stages, with sleeping models)."""
    # The shipped body limit: the suite's 64 KiB would answer a long schema-violating
    # prompt with 413 before validation could, which is right but not what the check expects.
    instance = stub_ingress({**app_args, "max_body_bytes": 1 << 20})
    return instance.__serve_build_asgi_app__()


@pytest.fixture(scope="module")
def api_schema(contract_app):
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {TEST_API_KEY}"},
            "generation": {
                "mode": "all",  # valid and invalid data
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,  # the same cases on every run
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},  # no links between operations to follow
        }
    )
    return schemathesis.openapi.from_asgi("/openapi.json", contract_app, config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    # schemathesis 4.32's from_fixture() reads and renames the test item
    # through Node._nodeid, which pytest 9.2 no longer has.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schemathesis.check
def openai_error_envelope(ctx, response, case):
    """Every 4xx and 5xx body is {"error": {"message": str, "type": str, "param": str|null, "code": str|null}}."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an error envelope: {response.text[:300]}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, f"error fields: {error}"
    assert isinstance(error["message"], str) and error["message"], "error.message must be a non-empty string"
    assert isinstance(error["type"], str) and error["type"], "error.type must be a non-empty string"
    assert error["param"] is None or isinstance(error["param"], str), "error.param must be a string or null"
    assert error["code"] is None or isinstance(error["code"], str), "error.code must be a string or null"
    return None


@schemathesis.check
def negative_data_rejected(ctx, response, case):
    """schemathesis's own check, except for multipart bodies: a form field is
    text, and the JSON types schemathesis mutates one into do not survive the
    form encoding (an empty array becomes no field at all, a number its
    digits), so such a "negative" case reaches the server as a valid form."""
    if (case.media_type or "").startswith("multipart/"):
        return None
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejected,
    openai_error_envelope,
]


@schema.parametrize()
def test_api_conforms_to_its_openapi_schema(case):
    response = case.call_and_validate(checks=CHECKS)
    # The coverage phase also tries each path with methods it does not document (405).
    documented = case.method.upper() == case.operation.method.upper()
    operation = case.operation.label if documented else "undocumented methods"
    status = str(response.status_code)
    if "text/event-stream" in response.headers.get("content-type", [""])[0]:
        status += " event-stream"
    mode = case.meta.generation.mode.value if case.meta else "explicit"
    TALLY[(operation, mode, status)] += 1


def test_contract_run_exercised_success_and_errors():
    """Runs after the contract test (file order): it saw every outcome of a generation."""
    if not TALLY:
        pytest.skip("needs test_api_conforms_to_its_openapi_schema to run first")
    lines = "\n".join(f"  {op} [{mode}] {status}: {n}" for (op, mode, status), n in sorted(TALLY.items()))
    print(f"\n{sum(TALLY.values())} contract cases:\n{lines}")
    seen = {status for (op, _, status) in TALLY if op == "POST /v1/images/generations"}
    assert {"200", "200 event-stream", "400", "401"} <= seen, lines
