"""The service's OpenAPI 3.1 description (``GET /openapi.json``), written out rather than generated: the request
bodies are raw images, ``.npy`` arrays and multipart files, which route-signature generators describe poorly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..bundle import package_version

if TYPE_CHECKING:
    from ..runtime import Guard
    from .app import ServeConfig

_ERR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Malformed body: bad JSON / base64 / multipart, undecodable image, malformed .npy",
            401: "Missing or wrong bearer token (when the service has one)",
            413: "Body, pixel count or number of inputs over the limit",
            415: "Unsupported content type",
            422: "Decodable, but not a valid model input (shape, dtype, NaN, range)",
            503: "Queue full or shutting down (Retry-After says when to retry)",
            504: "No answer within the request timeout"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": _ERR}}} for c in codes}


def _request_body(guard: Guard, config: ServeConfig) -> dict[str, Any]:
    """The inputs ``/v1/inspect`` and ``/v1/predict`` take: raw images, ``.npy``, JSON (base64) or multipart."""
    c, h, w = guard.input_shape
    image = {"type": "string", "format": "binary"}
    return {
        "required": True,
        "description": f"One or more inputs (model input: {c}x{h}x{w}; images are converted and resized like "
                       f"`abl-guard scan` does). At most {config.max_inputs} inputs and {config.max_body_bytes} "
                       "bytes per request.",
        "content": {
            "image/png": {"schema": image}, "image/jpeg": {"schema": image}, "image/*": {"schema": image},
            "application/x-npy": {"schema": image, "description": "uint8 (N,H,W[,C]) / (H,W[,C]) or float32 in "
                                  "[0,1] NCHW/NHWC; read with allow_pickle=False"},
            "application/json": {"schema": {"$ref": "#/components/schemas/JsonInputs"}},
            "multipart/form-data": {"schema": {"type": "object", "additionalProperties": image,
                                               "description": "one input per file part (an .npy part may hold "
                                                              "several); the id is the file name"}},
        },
    }


def _verdict_schema(classes: list[str]) -> dict[str, Any]:
    """One verdict: the record ``abl-guard scan`` writes."""
    return {"type": "object", "description": "The record `abl-guard scan` writes for an input.",
            "required": ["id", "label", "class_name", "confidence", "flagged", "p_value", "score"],
            "properties": {
                "id": {"type": "string"}, "label": {"type": "integer"},
                "class_name": {"type": "string", "enum": classes},
                "confidence": {"type": "number"}, "flagged": {"type": "boolean"},
                "score": {"type": "number", "description": "-log10(p_value); higher = more suspicious"},
                "threshold": {"type": ["number", "null"], "description": "flagged when score >= threshold"},
                "p_value": {"type": "number"},
                "kind": {"type": ["string", "null"], "description": "what the most significant detector's tail "
                                                                   "suggests"},
                "detectors": {"type": "object", "additionalProperties": {
                    "type": "object", "properties": {
                        "score": {"type": ["number", "null"]}, "p_value": {"type": "number"},
                        "tail": {"type": "string", "enum": ["low", "high"]}}}},
                "resized": {"type": "boolean"}}}


def _schemas(guard: Guard, config: ServeConfig) -> dict[str, Any]:
    """``components.schemas``: errors, the JSON request, verdicts and predictions (with this model's classes)."""
    classes = list(guard.class_names)
    return {
        "Error": {"type": "object", "required": ["error", "detail"], "properties": {
            "error": {"type": "string", "description": "reason (label of abl_guard_errors_total)"},
            "detail": {"type": "string"}, "request_id": {"type": ["string", "null"]}}},
        "JsonInputs": {"type": "object", "required": ["inputs"], "properties": {"inputs": {
            "type": "array", "maxItems": config.max_inputs, "items": {
                "type": "object", "required": ["image"], "properties": {
                    "image": {"type": "string", "description": "base64 of an encoded image (a data: URL is fine)"},
                    "id": {"type": ["string", "integer"]}}}}}},
        "Verdict": _verdict_schema(classes),
        "Prediction": {"type": "object", "properties": {
            "id": {"type": "string"}, "label": {"type": "integer"},
            "class_name": {"type": "string", "enum": classes}, "flagged": {"type": "boolean"}}},
    }


def _scoring_path(summary: str, key: str, schema: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
    """``POST`` of one scoring endpoint: answers ``{request_id, <key>: [<schema>, ...]}``, one item per input."""
    id_header = {"name": "X-Input-ID", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "Id of a single raw image / array input (default '0')."}
    rid_header = {"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
                  "description": "Echoed back and logged; generated when absent."}
    return {"post": {
        "summary": summary, "parameters": [id_header, rid_header], "requestBody": body,
        "responses": {"200": {"description": f"one {what} per input, in order", "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "request_id": {"type": "string"},
                key: {"type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}}}}}}},
            **_errors(400, 401, 413, 415, 422, 503, 504)}}}


def _paths(body: dict[str, Any]) -> dict[str, Any]:
    """Every endpoint; the probes and this document need no authentication (``security: []``)."""
    return {
        "/v1/inspect": _scoring_path("Verdicts: label, confidence, flag, p-value, score, kind and per-detector detail",
                                     "verdicts", "Verdict", "verdict", body),
        "/v1/predict": _scoring_path("Labels and flags only", "predictions", "Prediction", "prediction", body),
        "/v1/model": {"get": {"summary": "Model, detectors, threshold, calibration FPR and its 95% CI, limits",
                              "responses": {"200": {"description": "metadata", "content": {
                                  "application/json": {"schema": {"type": "object"}}}}, **_errors(401)}}},
        "/healthz": {"get": {"summary": "Liveness (no authentication)", "security": [],
                             "responses": {"200": {"description": "the process is up"}}}},
        "/readyz": {"get": {"summary": "Readiness (no authentication)", "security": [],
                            "responses": {"200": {"description": "accepting requests"},
                                          "503": {"description": "starting or shutting down"}}}},
        "/metrics": {"get": {"summary": "Prometheus text format", "responses": {
            "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401)}}},
        "/openapi.json": {"get": {"summary": "This document (no authentication)", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    }


def openapi_schema(guard: Guard, config: ServeConfig) -> dict[str, Any]:
    """The OpenAPI document for this guard (its input shape and class names are filled in)."""
    secured: list[dict[str, list[str]]] = [{"bearer": []}] if config.token else []
    return {
        "openapi": "3.1.0",
        "info": {"title": "abl-guard serve", "version": package_version(),
                 "description": "A guarded image classifier: every input gets a label and a verdict from detectors "
                                "calibrated to a target false-positive rate on clean data."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(guard, config),
        },
        "security": secured,
        "paths": _paths(_request_body(guard, config)),
    }
