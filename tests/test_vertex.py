"""Vertex AI through the real SDK, on loopback only: Application Default Credentials from
a file that needs no refresh, google-genai pointed at the fake server by
GOOGLE_VERTEX_BASE_URL, and no API key anywhere."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import adc_file, sample_prompts, write_prompts
from fake_gemini import FakeGemini, echo, hang_up

TOKEN = "ya29.fake-adc-token"


@pytest.fixture
def vertex(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The fake server and the environment a Vertex AI user has: project, location, an ADC file."""
    adc = adc_file(tmp_path / "adc.json", TOKEN)
    with FakeGemini() as server:
        for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project")
        monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "us-central1")
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
        monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", server.base_url)
        monkeypatch.setenv("NO_GCE_CHECK", "True")  # google-auth: never probe a metadata server
        monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
        yield server


def test_vertex_ai_with_application_default_credentials_and_no_key(tmp_path, vertex, run) -> None:
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(6)), "--temperature", "0.3")
    assert result.exit_code == 0, result.stderr
    assert sorted(vertex.answered.values()) == [1] * 6
    for request in vertex.requests:
        assert (
            request.path
            == "/v1beta1/projects/my-project/locations/us-central1/publishers/google/models/gemini-flash-latest:generateContent"
        )
        assert request.authorization == f"Bearer {TOKEN}" and request.api_key is None
        assert request.body["generationConfig"] == {"temperature": 0.3}


def test_vertex_ai_express_mode_takes_an_api_key(tmp_path, vertex, run, monkeypatch) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", "express-key")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT")
    monkeypatch.delenv("GOOGLE_CLOUD_LOCATION")
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(2)))
    assert result.exit_code == 0, result.stderr
    assert {r.api_key for r in vertex.requests} == {"express-key"}
    assert all("/publishers/google/models/" in r.path for r in vertex.requests)


@pytest.mark.parametrize(
    "unset, flags, named",
    [
        ("GOOGLE_CLOUD_LOCATION", [], "GOOGLE_CLOUD_LOCATION"),
        ("GOOGLE_APPLICATION_CREDENTIALS", [], "Application Default Credentials"),
        (None, ["--batch"], "--batch on Vertex AI"),
        (None, ["--service-tier", "flex"], "--service-tier on Vertex AI"),  # a 400 for every prompt (python-genai#2433)
    ],
)
def test_what_vertex_ai_lacks_is_one_line_before_any_request(
    tmp_path, vertex, run, monkeypatch, unset, flags, named
) -> None:
    if unset == "GOOGLE_APPLICATION_CREDENTIALS":
        monkeypatch.setenv(unset, str(tmp_path / "no-such-file.json"))
    elif unset:
        monkeypatch.delenv(unset)
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(2)), *flags)
    assert result.exit_code == 2 and not vertex.requests
    [line] = result.stderr.strip().splitlines()
    assert named in line and not (tmp_path / "outputs").exists()


def test_vertex_ai_at_an_address_where_nothing_listens_is_one_line_naming_it(
    tmp_path, vertex, run, monkeypatch
) -> None:
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", f"http://127.0.0.1:{port}")
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(6)), "--outage-limit-s", "1")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: cannot reach 127.0.0.1:{port}: connection refused"]
    assert not vertex.requests and not (result.output_dir / "failed.jsonl").exists()


def test_vertex_ai_probes_a_host_that_went_away_with_the_models_own_path(tmp_path, vertex, run) -> None:
    prompts = sample_prompts(6)
    vertex.behaviour = lambda request: hang_up() if request.attempt == 1 else echo(request)  # each first try: dropped
    result = run(write_prompts(tmp_path / "inputs", prompts), "--workers", "2")
    assert result.exit_code == 0, result.stderr
    assert vertex.model_gets >= 1  # the probe's models.get reached the fake server on Vertex AI's path


def test_on_vertex_ai_gs_uris_go_as_they_are_and_a_file_too_large_to_carry_fails_its_row(tmp_path, vertex, run) -> None:
    inputs = tmp_path / "inputs"
    (inputs / "photos").mkdir(parents=True)
    (inputs / "photos" / "small.png").write_bytes(b"\x89PNG" + bytes(1000))
    (inputs / "photos" / "large.png").write_bytes(b"\x89PNG" + bytes(30_000))
    rows = [
        {"id": "gs", "prompt": "describe", "files": ["gs://bucket/photo.png", "photos/small.png"]},
        {"id": "large", "prompt": "describe", "files": "photos/large.png"},
    ]
    (inputs / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run(inputs, "--inline-limit-mb", "0.02")
    assert result.exit_code == 1, result.stderr
    [request] = vertex.requests
    assert [(kind, mime) for kind, _, mime in request.media] == [("file", "image/png"), ("inline", "image/png")]
    assert request.media[0][1] == "gs://bucket/photo.png" and vertex.upload_log == []
    [failure] = result.failures()
    assert failure["id"] == "large" and "Vertex AI has no Files API" in failure["error"]


def test_on_vertex_ai_a_cache_and_an_estimate_ask_what_its_discovery_document_takes(tmp_path, vertex, run) -> None:
    """Issue 35: cachedContents and countTokens on Vertex AI's paths, each request held to
    aiplatform.v1beta1.json by the fake (a refusal would fail this test)."""
    (tmp_path / "context.txt").write_text("word " * 2000)
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(4))
    cached = run(inputs, "--context", str(tmp_path / "context.txt"), "--cache")
    assert cached.exit_code == 0, cached.stderr
    assert [event for event, _ in vertex.cache_events] == ["create", "delete"]
    assert all(
        name.startswith("projects/my-project/locations/us-central1/cachedContents/") for _, name in vertex.cache_events
    )
    assert {r.body.get("cachedContent") for r in vertex.requests} == {vertex.cache_events[0][1]}
    estimate = run(inputs, "--estimate", output_dir=tmp_path / "estimate")
    assert estimate.exit_code == 0, estimate.stderr
    assert vertex.count_tokens_requests and not vertex.refused_by_contract and not vertex.reply_problems
