from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from serve_app.errors import OpenAIError, to_openai_error


def test_envelope_shape():
    err = OpenAIError(400, "bad n", param="n", code="invalid_value")
    assert err.body() == {"error": {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}}


def test_lone_surrogates_from_the_client_are_escaped():
    err = OpenAIError(400, "The model '\udc00' does not exist.", param="model\ud800")
    assert err.response().body.decode("utf-8") and err.body()["error"]["message"] == "The model '\\udc00' does not exist."
    assert err.body()["error"]["param"] == "model\\ud800"


def test_validation_error_names_nested_param():
    exc = RequestValidationError([{"loc": ("body", "items", 2, "name"), "msg": "bad", "type": "string_type", "input": 5}])
    err = to_openai_error(exc)
    assert err.status == 400 and err.param == "items[2].name"


def test_json_syntax_error_has_no_param():
    exc = RequestValidationError([{"loc": ("body", 7), "msg": "JSON decode error", "type": "json_invalid"}])
    err = to_openai_error(exc)
    assert err.status == 400 and err.param is None and "JSON" in err.message


def test_http_errors_map_to_status():
    assert to_openai_error(HTTPException(404)).status == 404
    assert to_openai_error(HTTPException(405)).status == 405


def test_unexpected_exception_is_generic():
    err = to_openai_error(ValueError("/home/user/model.bin: bad magic 0xdeadbeef"), "req-123")
    assert err.status == 500 and err.type == "server_error"
    assert "deadbeef" not in err.message and "/home" not in err.message and "req-123" in err.message
