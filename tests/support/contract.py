"""Validation of our responses against OpenAI's official OpenAPI document (shared/contracts).

The document marks nullability OpenAPI-3.0 style (`nullable: true`), which JSON-Schema ignores;
we rewrite those schemas to also accept null before validating.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import yaml

SPEC = Path(__file__).resolve().parents[3] / "shared" / "contracts" / "openai-openapi.yaml"


def _accept_null(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _accept_null(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_accept_null(v) for v in node]
    return node


@functools.cache
def _components() -> dict[str, Any]:
    if not SPEC.exists():
        raise RuntimeError(f"the OpenAI contract is missing at {SPEC} (shared/ must sit beside the repo)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open() as handle:
        spec = yaml.load(handle, Loader=loader)
    return {"components": _accept_null(spec["components"])}


def validate(instance: Any, schema_name: str) -> None:
    """Raise `jsonschema.ValidationError` unless `instance` matches `components.schemas.<schema_name>`."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", **_components()}
    jsonschema.Draft202012Validator(schema).validate(instance)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert `response` is an OpenAI-shaped error with `status`; return its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])
