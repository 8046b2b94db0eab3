"""The OpenAPI 3.1 description of ``fedge edge serve``, served at ``/openapi.json``.

Written out rather than generated: Starlette has no request models to derive
it from, and a device should not carry pydantic for one document. Clients can
be generated from it, and the test suite fuzzes the server against it
(schemathesis). The limits in it are the server's own (``payload.Limits``).
"""

from typing import Any

from fedge.edge.device.payload import Limits

_ERROR = {
    "description": "The request was refused; `error` says why.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}


def _nested_numbers(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    for _ in range(depth):
        schema = {"type": "array", "minItems": 1, "items": schema}
    return schema


def openapi_schema(limits: Limits) -> dict[str, Any]:
    """The schema document, with ``limits`` filled in."""
    example = {
        "oneOf": [
            {**_nested_numbers(2), "description": "a raw HxW grayscale image, pixels 0..255"},
            {**_nested_numbers(3), "description": "a raw HxWxC image (C = 1, 3 or 4), 0..255"},
            {**_nested_numbers(1), "description": "a tabular row, in the task's column order"},
            {
                "type": "object",
                "additionalProperties": {"type": "number"},
                "description": "a tabular row keyed by column name",
            },
        ]
    }
    predict_json = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": limits.max_batch,
                "items": example,
                "description": "Raw examples, or model inputs when `preprocessed` is true "
                "(each shaped like the model input without its batch axis).",
            },
            "preprocessed": {"type": "boolean", "default": False},
            "return_logits": {"type": "boolean", "default": False},
        },
    }
    prediction = {
        "type": "object",
        "required": ["label", "index", "score"],
        "properties": {
            "label": {"type": "string"},
            "index": {"type": "integer", "minimum": 0},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "logits": {"type": "array", "items": {"type": "number"}},
        },
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fedge edge serve",
            "version": "1",
            "description": (
                f"Predictions of a signed fedge bundle. Bodies up to {limits.max_body_bytes} "
                f"bytes, {limits.max_batch} examples, {limits.max_parts} multipart parts and "
                f"{limits.max_request_pixels} decoded pixels per request."
            ),
        },
        "paths": {
            "/predict": {
                "post": {
                    "operationId": "predict",
                    "summary": "Top-1 label and score for each example",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": predict_json},
                            "application/x-npy": binary,
                            "application/octet-stream": binary,
                            "image/png": binary,
                            "image/jpeg": binary,
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "file": {
                                            "type": "array",
                                            "items": {"type": "string", "format": "binary"},
                                        }
                                    },
                                }
                            },
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "One prediction per example, in order.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["version", "artifact", "predictions"],
                                        "properties": {
                                            "version": {"type": "string"},
                                            "bundle_id": {"type": "string"},
                                            "artifact": {"type": "string"},
                                            "latency_ms": {"type": "number"},
                                            "predictions": {"type": "array", "items": prediction},
                                        },
                                    }
                                }
                            },
                        },
                        "400": _ERROR,
                        "413": _ERROR,
                        "415": _ERROR,
                        "422": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Whether a model is loaded, and which",
                    "responses": {
                        "200": {
                            "description": "Serving.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "503": {
                            "description": "No model is active yet.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus text format",
                    "responses": {
                        "200": {
                            "description": "Counters, latency histogram, the served artifact.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
