"""What every view needs: the app's services, JSON bodies loaded through a schema."""

from __future__ import annotations

from typing import Any

from flask import current_app, request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import BadRequest as WerkzeugBadRequest

from .errors import BadRequest, UnsupportedMediaType, ValidationFailed
from .schemas import field_errors


def ctx() -> dict[str, Any]:
    return current_app.extensions["imagepub"]


def json_body() -> Any:
    if not request.is_json:
        raise UnsupportedMediaType("send the request body as application/json")
    try:
        return request.get_json()
    except WerkzeugBadRequest:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None


def load(schema: Schema, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None


def load_query(schema: Schema) -> dict[str, Any]:
    try:
        return schema.load(request.args.to_dict())
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None
