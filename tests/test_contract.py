"""Issue 35: the fake holds every request to the real API's published messages (api_contract),
answers what does not fit as the API does, and serves replies those messages parse."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from google.protobuf import json_format

import api_contract
import pipeline
from conftest import write_prompts
from fake_gemini import FakeGemini

GENERATE = "/v1beta/models/gemini-flash-latest:generateContent"
TURN = [{"role": "user", "parts": [{"text": "hi"}]}]


def post(server: FakeGemini, path: str, body: dict, verb: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(
        server.base_url + path, json.dumps(body).encode(), method=verb, headers={"x-goog-api-key": "k"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"contents": TURN, "generationConfig": {"temprature": 0.5}},
            "Invalid JSON payload received. Unknown name \"temprature\" at 'generation_config': Cannot find field.",
        ),
        (
            {
                "contents": TURN,
                "generation_config": {"max_output_token": 5},
            },  # snake_case is read too, and checked the same
            "Invalid JSON payload received. Unknown name \"max_output_token\" at 'generation_config': Cannot find field.",
        ),
        (
            {"contents": TURN, "safetySettings": [{"category": "HARM_CATEGORY_SCARY", "threshold": "BLOCK_NONE"}]},
            "Invalid value at 'safety_settings[0].category' (type.googleapis.com/google.ai.generativelanguage.v1beta.HarmCategory), \"HARM_CATEGORY_SCARY\"",
        ),
        (
            {"contents": TURN, "generationConfig": {"temperature": "hot"}},
            "Invalid value at 'generation_config.temperature' (TYPE_FLOAT), \"hot\"",
        ),
        (
            {"contents": TURN, "generationConfig": {"stopSequences": "END"}},
            "Invalid value at 'generation_config.stop_sequences' (TYPE_STRING), \"END\"",
        ),
        (
            {"contents": [{"parts": [{"text": "a", "inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}]},
            "Invalid JSON payload received. Oneof field 'data' is already set. Cannot set 'inlineData'",
        ),
    ],
)
def test_the_fake_refuses_what_the_apis_messages_do_not_parse_as_the_api_does(body, message) -> None:
    with FakeGemini(expect_refusals=True) as server:
        status, reply = post(server, GENERATE, body)
    assert status == 400 and reply["error"]["status"] == "INVALID_ARGUMENT" and reply["error"]["message"] == message
    assert reply["error"]["details"] == [
        {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"description": message}]}
    ]
    assert server.requests == []  # refused before any answer is made, or paid


def test_an_unknown_path_or_query_parameter_is_refused_as_the_api_does() -> None:
    with FakeGemini(expect_refusals=True) as server:
        assert post(server, "/v1beta/models/m:generateContents", {"contents": TURN})[0] == 404
        assert post(server, "/v1beta/cachedContents/abc", {}, verb="PUT")[0] == 404
        status, reply = post(server, "/v1beta/files?pageSize=2&page_sise=3", {}, verb="GET")
    assert status == 400 and reply["error"]["message"].startswith(
        'Invalid JSON payload received. Unknown name "page_sise": Cannot bind query parameter.'
    )


def test_an_accepted_request_is_answered() -> None:
    body = {
        "contents": TURN,
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {
            "topK": 3.0,
            "temperature": "0.5",
            "thinkingConfig": {"thinking_budget": 0},
            "mediaResolution": "MEDIA_RESOLUTION_LOW",
        },
        "serviceTier": "flex",
    }
    with FakeGemini() as server:
        status, reply = post(server, GENERATE, body)
    assert status == 200 and reply["candidates"][0]["content"]["parts"][0]["text"] == "echo: hi"


WALKER_CASES = [
    {"contents": TURN},
    {"contents": TURN, "generationConfig": {"topK": 3.0}},
    {"contents": TURN, "generationConfig": {"topK": 3.5}},
    {"contents": TURN, "generationConfig": {"temperature": "0.5"}},
    {"contents": TURN, "generationConfig": {"seed": "12"}},
    {"contents": TURN, "generationConfig": {"responseJsonSchema": {"type": "object", "anything": [1, {"x": None}]}}},
    {"contents": TURN, "generationConfig": {"responseMimeType": 7}},
    {"contents": TURN, "generationConfig": {"mediaResolution": "LOW"}},
    {"contents": TURN, "generationConfig": {"thinkingConfig": {"thinkingBudget": -1, "includeThoughts": True}}},
    {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]}]},
    {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "not base64!"}}]}]},
    {"contents": [{"parts": [{"fileData": {"fileUri": "https://x/y.pdf", "mimeType": "application/pdf"}}]}]},
    {"contents": "hi"},
    {
        "contents": TURN,
        "cachedContent": "cachedContents/abc",
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    },
    {"contents": TURN, "tools": [{"codeExecution": {}}], "toolConfig": {"functionCallingConfig": {"mode": "NONE"}}},
    {"contents": TURN, "nope": 1},
]


@pytest.mark.parametrize("body", WALKER_CASES)
def test_the_check_answers_what_protobufs_own_json_parser_answers(body) -> None:
    """api_contract walks the package's descriptors itself (to word the API's messages); on
    every case it agrees with google.protobuf.json_format, the package's own parser. (Not on
    `true` for a number, which Python's parser takes as 1 and the API's does not.)"""
    from google.ai import generativelanguage_v1beta as v1beta

    try:
        json_format.ParseDict(body, v1beta.GenerateContentRequest.pb()(), ignore_unknown_fields=False)
        parsed = True
    except json_format.ParseError:
        parsed = False
    schema = api_contract.gemini()
    assert (api_contract.problem_in(schema, schema.message("GenerateContentRequest"), body, "") is None) is parsed


def test_each_newer_field_is_still_missing_from_the_package() -> None:
    """NEWER_GEMINI lists what the live API has and google-ai-generativelanguage lacks: once
    a newer package has one, this fails, and its line goes."""
    from google.ai import generativelanguage_v1beta as v1beta

    for message_name, new, page, sender in api_contract.NEWER_GEMINI:
        assert page.startswith("https://ai.google.dev/") and sender
        found = v1beta
        for part in message_name.split("."):
            found = getattr(found, part, None)
        assert found is None or new.name not in found.meta.fields, (
            f"{message_name}.{new.name} is in the package now: remove it from NEWER_GEMINI"
        )


def test_google_genai_would_ask_v1_which_refuses_a_system_instruction_so_the_pipeline_pins_v1beta(
    tmp_path, fake_gemini, run, monkeypatch
) -> None:
    """What the strict fake found: google-genai 3.6.1 asks the Gemini API's v1 by default,
    whose messages have no systemInstruction (a 400 for every prompt)."""
    server = fake_gemini()
    server.expect_refusals = True
    inputs = write_prompts(tmp_path / "inputs", ["a", "b", "c"])
    monkeypatch.setattr(pipeline, "API_VERSION_GEMINI", None)  # the SDK's own default
    refused = run(inputs, "--system-instruction", "be brief", output_dir=tmp_path / "sdk_default")
    assert refused.exit_code == 1 and not refused.records()
    assert all(
        'Unknown name "systemInstruction": Cannot find field.' in f["error"] and f["permanent"]
        for f in refused.failures()
    )
    assert server.refused_by_contract and all(r.startswith("POST /v1/models/") for r in server.refused_by_contract)
    monkeypatch.setattr(pipeline, "API_VERSION_GEMINI", "v1beta")
    server.refused_by_contract.clear()
    pinned = run(inputs, "--system-instruction", "be brief")
    assert pinned.exit_code == 0, pinned.stderr
    assert {r.path for r in server.requests[-3:]} == {GENERATE}


def test_a_misspelt_setting_is_refused_before_the_wire(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    (tmp_path / "config.json").write_text(json.dumps({"top_kk": 3}))
    result = run(write_prompts(tmp_path / "inputs", ["a"]), "--generation-config", str(tmp_path / "config.json"))
    assert result.exit_code == 2 and "topKk: Extra inputs are not permitted" in result.stderr
    assert not server.requests and not server.refused_by_contract


def test_every_reply_the_fake_serves_is_its_methods_response_with_what_the_api_always_sends(
    tmp_path, fake_gemini, run
) -> None:
    """Interactive answers, countTokens (--estimate), the Files API, a context cache and a
    batch job: each reply parses as its method's response message (api_contract) and carries
    MUST_HAVE; a batch job, whose messages the package lacks, its createTime and state."""
    server = fake_gemini()
    inputs = tmp_path / "inputs"
    (inputs / "photos").mkdir(parents=True)
    (inputs / "photos" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 200)
    (inputs / "rows.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"look {i}", "files": "photos/big.png"}) + "\n" for i in range(3))
    )
    (tmp_path / "context.txt").write_text("word " * 2000)
    assert run(inputs, "--inline-limit-mb", "0.01", output_dir=tmp_path / "files").exit_code == 0
    assert run(inputs, "--estimate").exit_code == 0
    assert (
        run(inputs, "--context", str(tmp_path / "context.txt"), "--cache", output_dir=tmp_path / "cache").exit_code == 0
    )
    assert run(inputs, "--batch", "--batch-poll-s", "0.01", output_dir=tmp_path / "batch").exit_code == 0
    assert server.upload_log and server.cache_events and server.batches and server.count_tokens_requests
    assert server.reply_problems == []
    for job in server.batches.values():
        assert job.state == "BATCH_STATE_SUCCEEDED"
        operation = server._operation(job)
        assert operation["metadata"]["createTime"] and operation["metadata"]["state"]


VERTEX_GENERATE = (
    "/v1beta1/projects/p/locations/us-central1/publishers/google/models/gemini-flash-latest:generateContent"
)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            VERTEX_GENERATE,
            {"contents": TURN, "generationConfig": {"temprature": 0.5}},
            "Invalid JSON payload received. Unknown name \"temprature\" at 'generation_config': Cannot find field.",
        ),
        (
            VERTEX_GENERATE,
            {"contents": TURN, "serviceTier": "flex"},
            'Invalid JSON payload received. Unknown name "serviceTier": Cannot find field.',
        ),
        (
            VERTEX_GENERATE,
            {"contents": TURN, "generationConfig": {"thinkingConfig": {"thinkingLevel": "LOTS"}}},
            "Invalid value at 'generation_config.thinking_config.thinking_level' (thinkingLevel), \"LOTS\"",
        ),
        (
            "/v1beta1/projects/p/locations/l/cachedContents",
            {"model": "m", "contents": TURN, "ttl": "an hour"},
            "Invalid value at 'ttl' (TYPE_DURATION), \"an hour\"",
        ),
    ],
)
def test_on_vertex_ai_the_fake_holds_requests_to_its_discovery_document(path, body, message) -> None:
    with FakeGemini(expect_refusals=True) as server:
        status, reply = post(server, path, body)
    assert status == 400 and reply["error"]["message"] == message and reply["error"]["status"] == "INVALID_ARGUMENT"
