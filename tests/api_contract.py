"""The Gemini API's and Vertex AI's contract, from Google's own published schemas: the fake
checks every request against it, and a test checks every reply the fake serves.

The Gemini API parses a JSON body with the protocol buffers of `google.ai.generativelanguage`
(the `google-ai-generativelanguage` package, pinned in requirements.txt): proto3 JSON, each
field by its lowerCamelCase or its original snake_case name, enums by name (or number).
Vertex AI's messages are its Discovery document, `aiplatform.v1beta1.json`, which
`google-api-python-client` ships. Both are read here into one shape (Message: its fields by
either name) so that one walk (problem_in) answers what the API's parser would: None, or the
message of its 400 INVALID_ARGUMENT. A path no route names is the API's 404.

The package lags the live API: NEWER lists what the API documents and google-genai sends that
its messages do not have yet, each with the page that shows it and the SDK code that sends it.
A newer package that has one makes that entry fail its test (tests/test_contract.py): remove it.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
SCALARS = ("string", "bytes", "bool", "int", "float", "value", "struct", "list", "duration", "timestamp", "any")


@dataclass(frozen=True)
class Field:
    """One field of a message: `kind` is one of SCALARS, "message" or "enum"; `ref` names
    the message (or, for an enum, the enum's type, as the API's message names it)."""

    name: str  # the original snake_case name: the API's messages say it so
    json_name: str
    kind: str
    ref: str = ""
    repeated: bool = False
    values: frozenset[str] = frozenset()  # an enum's names
    oneof: str = ""
    map_of: Field | None = None  # a map's value


@dataclass
class Message:
    name: str  # e.g. google.ai.generativelanguage.v1beta.GenerationConfig
    fields: dict[str, Field] = field(default_factory=dict)  # by both names


@dataclass
class Schema:
    """A whole API's messages, by name."""

    messages: dict[str, Message]
    package: (
        str  # what a short name is within: "google.ai.generativelanguage.v1beta." or "GoogleCloudAiplatformV1beta1"
    )

    def message(self, name: str) -> Message:
        return self.messages[name if name in self.messages else self.package + name]


# -------------------------------------------------------------- the Gemini API --
WELL_KNOWN = {
    "google.protobuf.Value": "value",
    "google.protobuf.Struct": "struct",
    "google.protobuf.ListValue": "list",
    "google.protobuf.Duration": "duration",
    "google.protobuf.Timestamp": "timestamp",
    "google.protobuf.FieldMask": "string",
    "google.protobuf.Any": "any",
    "google.protobuf.Int32Value": "int",
    "google.protobuf.Int64Value": "int",
    "google.protobuf.FloatValue": "float",
    "google.protobuf.DoubleValue": "float",
    "google.protobuf.BoolValue": "bool",
    "google.protobuf.StringValue": "string",
    "google.protobuf.BytesValue": "bytes",
}
PROTO_KINDS = {
    1: "float",
    2: "float",
    3: "int",
    4: "int",
    5: "int",
    6: "int",
    7: "int",
    8: "bool",
    9: "string",
    12: "bytes",
    13: "int",
    15: "int",
    16: "int",
    17: "int",
    18: "int",
}


def proto_field(descriptor: Any) -> Field:
    """A protobuf FieldDescriptor as a Field."""
    oneof = (
        descriptor.containing_oneof.name
        if descriptor.containing_oneof and not descriptor.containing_oneof.name.startswith("_")
        else ""
    )
    repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") else descriptor.label == 3
    if descriptor.enum_type is not None:
        values = frozenset(value.name for value in descriptor.enum_type.values)
        return Field(
            descriptor.name,
            descriptor.json_name,
            "enum",
            "type.googleapis.com/" + descriptor.enum_type.full_name,
            repeated,
            values,
            oneof,
        )
    message = descriptor.message_type
    if message is None:
        return Field(
            descriptor.name, descriptor.json_name, PROTO_KINDS[descriptor.type], repeated=repeated, oneof=oneof
        )
    if message.GetOptions().map_entry:
        value = proto_field(message.fields_by_name["value"])
        return Field(descriptor.name, descriptor.json_name, "map", oneof=oneof, map_of=value)
    kind = WELL_KNOWN.get(message.full_name, "message")
    return Field(
        descriptor.name,
        descriptor.json_name,
        kind,
        message.full_name if kind == "message" else "",
        repeated,
        oneof=oneof,
    )


@functools.cache
def gemini(version: str = "v1beta") -> Schema:
    """The Gemini API's messages of `version`, from the installed google-ai-generativelanguage
    (and, for v1beta, NEWER's). google-genai 3 asks v1 unless told otherwise, where the
    messages lack systemInstruction, cachedContent, responseJsonSchema and thinkingConfig."""
    import importlib

    module = importlib.import_module(f"google.ai.generativelanguage_{version}")
    messages: dict[str, Message] = {}
    pending = [getattr(module, name).pb().DESCRIPTOR for name in dir(module) if hasattr(getattr(module, name), "pb")]
    while pending:
        descriptor = pending.pop()
        if descriptor.full_name in messages or descriptor.full_name in WELL_KNOWN:
            continue
        message = messages[descriptor.full_name] = Message(descriptor.full_name)
        for proto in descriptor.fields:
            message.fields[proto.name] = message.fields[proto.json_name] = proto_field(proto)
            if proto.message_type is not None and not proto.message_type.GetOptions().map_entry:
                pending.append(proto.message_type)
    schema = Schema(messages, f"google.ai.generativelanguage.{version}.")
    if version == "v1beta":
        add_newer(schema, NEWER_GEMINI)
    return schema


# The Gemini API's fields and messages that google-ai-generativelanguage (0.12.1) lacks:
# (message, field, the page that documents it, the google-genai code that sends it).
BATCH_PAGE = "https://ai.google.dev/api/batch-mode (models.batchGenerateContent, GenerateContentBatch, InputConfig)"
NEWER_GEMINI: list[tuple[str, Field, str, str]] = [
    (
        "GenerateContentRequest",
        Field(
            "service_tier",
            "serviceTier",
            "enum",
            "type.googleapis.com/google.ai.generativelanguage.v1beta.ServiceTier",
            values=frozenset(
                {"SERVICE_TIER_UNSPECIFIED", "STANDARD", "FLEX", "PRIORITY", "standard", "flex", "priority"}
            ),
        ),
        "https://ai.google.dev/gemini-api/docs/flex-inference",
        "google/genai/models.py _GenerateContentConfig_to_mldev: service_tier -> serviceTier",
    ),
    (
        "ThinkingConfig",
        Field(
            "thinking_level",
            "thinkingLevel",
            "enum",
            "type.googleapis.com/google.ai.generativelanguage.v1beta.ThinkingConfig.ThinkingLevel",
            values=frozenset({"THINKING_LEVEL_UNSPECIFIED", "MINIMAL", "LOW", "MEDIUM", "HIGH"}),
        ),
        "https://ai.google.dev/gemini-api/docs/thinking",
        "google/genai/models.py _GenerateContentConfig_to_mldev: thinking_config passed as it is",
    ),
    (
        "GenerateContentResponse.UsageMetadata",
        Field(
            "service_tier",
            "serviceTier",
            "enum",
            "type.googleapis.com/google.ai.generativelanguage.v1beta.ServiceTier",
            values=frozenset({"STANDARD", "FLEX", "PRIORITY"}),
        ),
        "https://ai.google.dev/gemini-api/docs/priority-inference (the tier that served a request)",
        "read by pipeline.py from the x-gemini-service-tier header: google-genai 3.6.1 drops it",
    ),
    (
        "BatchGenerateContentRequest",
        Field("batch", "batch", "message", "GenerateContentBatch"),
        BATCH_PAGE,
        "google/genai/batches.py _CreateBatchJobParameters_to_mldev",
    ),
    ("GenerateContentBatch", Field("display_name", "displayName", "string"), BATCH_PAGE, "google/genai/batches.py"),
    (
        "GenerateContentBatch",
        Field("input_config", "inputConfig", "message", "InputConfig"),
        BATCH_PAGE,
        "google/genai/batches.py _BatchJobSource_to_mldev",
    ),
    ("GenerateContentBatch", Field("model", "model", "string"), BATCH_PAGE, "google/genai/batches.py"),
    ("GenerateContentBatch", Field("priority", "priority", "int"), BATCH_PAGE, "google/genai/batches.py"),
    (
        "InputConfig",
        Field("file_name", "fileName", "string", oneof="source"),
        BATCH_PAGE,
        "google/genai/batches.py _BatchJobSource_to_mldev: file_name",
    ),
    (
        "InputConfig",
        Field("requests", "requests", "message", "InlinedRequests", oneof="source"),
        BATCH_PAGE,
        "google/genai/batches.py: inlined_requests",
    ),
    (
        "InlinedRequests",
        Field("requests", "requests", "message", "InlinedRequest", repeated=True),
        BATCH_PAGE,
        "google/genai/batches.py",
    ),
    (
        "InlinedRequest",
        Field("request", "request", "message", "GenerateContentRequest"),
        BATCH_PAGE,
        "google/genai/batches.py _InlinedRequest_to_mldev",
    ),
    (
        "InlinedRequest",
        Field("metadata", "metadata", "struct"),
        BATCH_PAGE,
        "google/genai/batches.py _InlinedRequest_to_mldev",
    ),
    (
        "BatchFileLine",
        Field("key", "key", "string"),
        "https://ai.google.dev/gemini-api/docs/batch-mode (input file: a key and a GenerateContentRequest per line)",
        "pipeline.py batch_line",
    ),
    (
        "BatchFileLine",
        Field("request", "request", "message", "GenerateContentRequest"),
        "https://ai.google.dev/gemini-api/docs/batch-mode",
        "pipeline.py batch_line",
    ),
]


def add_newer(schema: Schema, newer: list[tuple[str, Field, str, str]]) -> None:
    for message_name, new, _page, _sender in newer:
        message = schema.messages.setdefault(schema.package + message_name, Message(schema.package + message_name))
        if new.kind == "message" and "." not in new.ref:
            new = Field(
                new.name, new.json_name, new.kind, schema.package + new.ref, new.repeated, new.values, new.oneof
            )
        message.fields[new.name] = message.fields[new.json_name] = new


# ---------------------------------------------------------------- Vertex AI --
DISCOVERY_FORMATS = {
    "byte": "bytes",
    "google-duration": "duration",
    "google-datetime": "timestamp",
    "google-fieldmask": "string",
}


def discovery_field(name: str, spec: dict[str, Any], package: str) -> Field:
    """A property of a Discovery document's schema as a Field."""
    snake = re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
    if spec.get("type") == "array":
        item = discovery_field(name, spec.get("items", {}), package)
        return Field(snake, name, item.kind, item.ref, True, item.values, map_of=item.map_of)
    if "$ref" in spec:
        return Field(snake, name, "message", package + spec["$ref"].removeprefix(package))
    if "enum" in spec:
        return Field(snake, name, "enum", name, values=frozenset(spec["enum"]))
    if spec.get("type") == "object":
        extra = spec.get("additionalProperties", {"type": "any"})
        return (
            Field(snake, name, "struct")
            if extra.get("type") == "any"
            else Field(snake, name, "map", map_of=discovery_field(name, extra, package))
        )
    kind = DISCOVERY_FORMATS.get(
        spec.get("format", ""),
        {"string": "string", "integer": "int", "number": "float", "boolean": "bool", "any": "value"}[
            spec.get("type", "any")
        ],
    )
    return Field(snake, name, "int" if spec.get("format") in ("int64", "uint64", "int32", "uint32") else kind)


@functools.cache
def vertex() -> Schema:
    """Vertex AI's v1beta1 messages, from the Discovery document google-api-python-client ships."""
    import googleapiclient

    document = json.loads(
        (
            Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "aiplatform.v1beta1.json"
        ).read_text()
    )
    package = "GoogleCloudAiplatformV1beta1"
    messages = {}
    for name, spec in document["schemas"].items():
        message = messages[name] = Message(name)
        for json_name, property_spec in spec.get("properties", {}).items():
            found = discovery_field(json_name, property_spec, "")
            message.fields[found.name] = message.fields[json_name] = found
    return Schema(messages, package)


# ------------------------------------------------------------------ routes --
@dataclass(frozen=True)
class Route:
    """A method: its HTTP verb and path, the message its body must be (None: no body), the
    query parameters it takes besides the system ones, and the message of its reply."""

    verb: str
    path: re.Pattern[str]
    request: str | None
    query: frozenset[str] = frozenset()
    response: str | None = None


SYSTEM_QUERY = frozenset({"key", "alt", "$alt", "prettyPrint", "fields", "upload_protocol", "uploadType"})
GEMINI_MODEL = r"/v1beta/models/[^/:]+"
VERTEX_MODEL = (
    r"/v1beta1/(?:projects/[^/]+/locations/[^/]+/)?publishers/google/models/[^/:]+"  # express mode names no project
)
VERTEX_CACHES = r"/v1beta1/projects/[^/]+/locations/[^/]+/cachedContents"
LISTING = frozenset({"pageSize", "pageToken"})


def route(
    verb: str, path: str, request: str | None, query: frozenset[str] = frozenset(), response: str | None = None
) -> Route:
    return Route(verb, re.compile(path), request, query, response)


GEMINI_ROUTES = [
    route("POST", GEMINI_MODEL + ":generateContent", "GenerateContentRequest", response="GenerateContentResponse"),
    route("POST", GEMINI_MODEL + ":countTokens", "CountTokensRequest", response="CountTokensResponse"),
    route("POST", GEMINI_MODEL + ":batchGenerateContent", "BatchGenerateContentRequest"),
    route("GET", GEMINI_MODEL, None, response="Model"),
    route("GET", r"/v1beta/batches", None, LISTING | {"filter"}),
    route("GET", r"/v1beta/batches/[^/:]+", None),
    route("POST", r"/v1beta/batches/[^/:]+:cancel", None),
    route("DELETE", r"/v1beta/batches/[^/:]+", None),
    route("POST", r"/upload/v1beta/files", "CreateFileRequest"),  # the resumable upload's start; its chunks are bytes
    route("GET", r"/v1beta/files", None, LISTING, "ListFilesResponse"),
    route("GET", r"/v1beta/files/[^/:]+", None, response="File"),
    route("GET", r"/v1beta/files/[^/:]+:download", None),
    route("DELETE", r"/v1beta/files/[^/:]+", None),
    route("POST", r"/v1beta/cachedContents", "CachedContent", response="CachedContent"),
    route("GET", r"/v1beta/cachedContents", None, LISTING, "ListCachedContentsResponse"),
    route("GET", r"/v1beta/cachedContents/[^/:]+", None, response="CachedContent"),
    route("PATCH", r"/v1beta/cachedContents/[^/:]+", "CachedContent", frozenset({"updateMask"}), "CachedContent"),
    route("DELETE", r"/v1beta/cachedContents/[^/:]+", None),
]
GEMINI_V1_ROUTES = [  # the stable version: generateContent and countTokens, and no Files, Batch or caching API
    route("POST", r"/v1/models/[^/:]+:generateContent", "GenerateContentRequest", response="GenerateContentResponse"),
    route("POST", r"/v1/models/[^/:]+:countTokens", "CountTokensRequest", response="CountTokensResponse"),
    route("GET", r"/v1/models/[^/:]+", None, response="Model"),
]
VERTEX_ROUTES = [
    route("POST", VERTEX_MODEL + ":generateContent", "GenerateContentRequest", response="GenerateContentResponse"),
    route("POST", VERTEX_MODEL + ":countTokens", "CountTokensRequest", response="CountTokensResponse"),
    route("GET", VERTEX_MODEL, None, response="PublisherModel"),
    route("POST", VERTEX_CACHES, "CachedContent", response="CachedContent"),
    route("GET", VERTEX_CACHES, None, LISTING, "ListCachedContentsResponse"),
    route("GET", VERTEX_CACHES + "/[^/:]+", None, response="CachedContent"),
    route("PATCH", VERTEX_CACHES + "/[^/:]+", "CachedContent", frozenset({"updateMask"}), "CachedContent"),
    route("DELETE", VERTEX_CACHES + "/[^/:]+", None),
]


def route_of(verb: str, path: str) -> tuple[Schema, Route] | None:
    """The API and method a request names, or None (the API answers 404)."""
    for schema, routes in (
        (gemini, GEMINI_ROUTES),
        (functools.partial(gemini, "v1"), GEMINI_V1_ROUTES),
        (vertex, VERTEX_ROUTES),
    ):
        for known in routes:
            if known.verb == verb and known.path.fullmatch(path):
                return schema(), known
    return None


# ------------------------------------------------------------- the checks --
def request_problem(verb: str, path: str, query: dict[str, str], body: Any) -> tuple[int, str] | None:
    """What the API answers a request that does not fit its method: (404, ...) for a
    method it does not have, (400, its message) for a body or query it cannot parse."""
    found = route_of(verb, path)
    if found is None:
        return 404, f"Method not found: {verb} {path}"
    schema, method = found
    for name in query:
        if name not in SYSTEM_QUERY and name not in method.query:
            return (
                400,
                f"Invalid JSON payload received. Unknown name \"{name}\": Cannot bind query parameter. Field '{name}' could not be found in request message.",
            )
    if method.request is None:
        return None
    problem = problem_in(schema, schema.message(method.request), body, "")
    return (400, problem) if problem else None


def problem_in(schema: Schema, message: Message, value: Any, path: str) -> str | None:
    """Why `value` is not `message` in proto3 JSON, as the API says it; None if it is."""
    if not isinstance(value, dict):
        return invalid(path, "type.googleapis.com/" + message.name, value)
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        known = message.fields.get(key)
        if known is None:
            return f'Invalid JSON payload received. Unknown name "{key}"{f" at {path!r}" if path else ""}: Cannot find field.'
        if known.oneof and item is not None:
            if known.oneof in oneofs:
                return f"Invalid JSON payload received. Oneof field '{known.oneof}' is already set. Cannot set '{key}'"
            oneofs[known.oneof] = key
        here = f"{path}.{known.name}" if path else known.name
        if item is None:
            continue  # null is a field left unset
        if known.repeated:
            if not isinstance(item, list):
                return invalid(here, type_name(known), item)
            for index, element in enumerate(item):
                if problem := value_problem(schema, known, element, f"{here}[{index}]"):
                    return problem
        elif problem := value_problem(schema, known, item, here):
            return problem
    return None


def value_problem(schema: Schema, known: Field, value: Any, path: str) -> str | None:
    if known.kind == "message":
        return problem_in(schema, schema.message(known.ref), value, path)
    if known.kind == "map":
        if not isinstance(value, dict):
            return invalid(path, "map", value)
        return next(
            (
                p
                for k, v in value.items()
                if known.map_of and (p := value_problem(schema, known.map_of, v, f"{path}[{k}]"))
            ),
            None,
        )
    if known.kind == "enum":
        return (
            None
            if (isinstance(value, str) and value in known.values)
            or (isinstance(value, int) and not isinstance(value, bool))
            else invalid(path, known.ref, value)
        )
    return None if scalar_fits(known.kind, value) else invalid(path, type_name(known), value)


def scalar_fits(kind: str, value: Any) -> bool:
    """Whether proto3 JSON reads `value` as a field of this kind."""
    if kind in ("value", "any"):
        return kind == "value" or isinstance(value, dict)
    if kind == "struct":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":  # a number with no fraction (3.0 is 3), or one as a string
        if isinstance(value, float):
            return value.is_integer()
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"-?\d+", value) is not None
        )
    if kind == "float":
        if isinstance(value, str):
            return (
                value in ("NaN", "Infinity", "-Infinity")
                or re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value) is not None
            )
        return isinstance(value, int | float) and not isinstance(value, bool)
    if not isinstance(value, str):
        return False
    if kind == "bytes":  # standard or URL-safe base64, padded or not: checked, not decoded (an image's is megabytes)
        if not value.isascii():
            return False
        data = value.encode().rstrip(b"=")
        return len(value) - len(data) <= 2 and not data.translate(None, BASE64_ALPHABET) and len(data) % 4 != 1
    if kind == "duration":
        return re.fullmatch(r"-?\d+(\.\d{1,9})?s", value) is not None
    if kind == "timestamp":
        return re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", value) is not None
    return True


def type_name(known: Field) -> str:
    return {"message": f"type.googleapis.com/{known.ref}", "enum": known.ref}.get(
        known.kind, f"TYPE_{known.kind.upper()}"
    )


def invalid(path: str, type_: str, value: Any) -> str:
    """The API's message for a value of the wrong type (it quotes the value as JSON)."""
    return f"Invalid value at '{path}' ({type_}), {json.dumps(value)[:200]}"


def response_problem(verb: str, path: str, body: Any, must_have: tuple[str, ...] = ()) -> str | None:
    """Why a reply the fake served is not its method's response message, or lacks what the
    real API always sends (`must_have`, dotted: "usageMetadata.totalTokenCount")."""
    found = route_of(verb, path)
    if found is None or found[1].response is None:
        return None
    schema, method = found
    if problem := problem_in(schema, schema.message(method.response), body, ""):
        return problem
    for dotted in must_have:
        value: Any = body
        for part in dotted.split("."):
            value = value[0] if isinstance(value, list) and value else value
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return f"{method.response} without {dotted}"
    return None
