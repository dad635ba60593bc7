"""Files in prompts: the images, PDFs and recordings rows name go inline while a request
stays small, else through the Files API once per content, recorded so that reruns reuse
them, and deleted once the job needs them no more."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

import pipeline
from conftest import ROOT, start_pipeline, wait_for_writes
from fake_gemini import FakeGemini, away_once, echo, error

LIMIT_MB = 0.02  # the inline limit these tests set: 20 KB, so that images of 24 KB and more are uploaded


def images(folder: Path, count: int, small: int = 2_000, large: int = 24_000) -> list[Path]:
    """`count` PNG files of distinct bytes, every other one over LIMIT_MB once base64."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = random.Random(count), []
    for i in range(count):
        path = folder / f"image_{i:03d}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.randbytes(large if i % 2 else small))
        paths.append(path)
    return paths


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def our_uploads(server: FakeGemini) -> Counter[str]:
    """The server's uploads of files rows named (not batch request files), by the file's SHA-256."""
    return Counter(digest for name, digest in server.upload_log if name.startswith(pipeline.UPLOAD_NAME_PREFIX))


def left_on_server(server: FakeGemini) -> list[str]:
    return [
        name
        for name, meta in server.file_meta.items()
        if name in server.files and meta["displayName"].startswith(pipeline.UPLOAD_NAME_PREFIX)
    ]


def csv_of(inputs: Path, rows: list[tuple[str, str, list[Path]]]) -> None:
    lines = ["id,prompt,files"] + [
        f"{row_id},{prompt},{'|'.join(str(p.relative_to(inputs)) for p in files)}" for row_id, prompt, files in rows
    ]
    (inputs / "rows.csv").write_text("\n".join(lines) + "\n")


def test_a_thousand_rows_naming_200_images_get_their_own_images_and_each_large_one_is_uploaded_once(
    tmp_path, fake_gemini, run
) -> None:
    """The issue's own figures: 1,000 rows, 200 images each named by 5, half of them over a
    1 MB inline limit (760 KB is over 1 MB in base64); then the same rows with --batch."""
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 200, small=10_000, large=760_000)
    rows = [(f"r{i}", f"describe picture {i}", [pictures[i % 200]]) for i in range(1000)]
    csv_of(inputs, rows)
    server = fake_gemini()
    result = run(inputs, "--inline-limit-mb", "1", "--workers", "20", "--shard-size", "100")
    assert result.exit_code == 0, result.stderr
    assert sorted(server.answered.values()) == [1] * 1000 and len(result.records()) == 1000
    uploaded = {meta["uri"]: base64.b64decode(meta["sha256Hash"]).hex() for meta in server.file_meta.values()}
    expected = {prompt: [sha(path) for path in files] for _, prompt, files in rows}
    for request in server.requests:
        sent = [digest if kind == "inline" else uploaded[digest] for kind, digest, _ in request.media]
        assert sent == expected[request.prompt], request.prompt
        assert [kind for kind, _, _ in request.media] == [
            "file" if path.stat().st_size > 15_000 else "inline" for path in rows[int(request.prompt.split()[-1])][2]
        ]
    assert our_uploads(server) == Counter({sha(path): 1 for path in pictures[1::2]})  # each large image once
    assert "100 files uploaded" in result.stderr
    assert left_on_server(server) == []  # and none left once every row is answered

    batch = run(inputs, "--batch", "--batch-poll-s", "0.01", "--inline-limit-mb", "1", output_dir=tmp_path / "batch")
    assert batch.exit_code == 0, batch.stderr
    requests = [request for job in server.batches.values() for _, request in job.requests]
    assert len(requests) == 1000 and not any(
        "inline_data" in part or "inlineData" in part for r in requests for part in r["contents"][-1]["parts"]
    )
    assert {r["id"]: r["response"] for r in batch.records()} == {
        r["id"]: r["response"] for r in result.records()
    }  # by key
    assert left_on_server(server) == []


def test_a_rows_files_go_after_its_text_in_order_and_urls_as_they_are(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    small, large, _other = images(inputs / "photos", 3, small=1_000, large=30_000)
    (inputs / "rows.jsonl").write_text(
        json.dumps(
            {
                "id": "a",
                "prompt": "compare",
                "files": [
                    str(large.relative_to(inputs)),
                    "https://example.com/spec.pdf",
                    str(small.relative_to(inputs)),
                ],
            }
        )
        + "\n"
    )
    server = fake_gemini()
    result = run(inputs, "--inline-limit-mb", str(LIMIT_MB))
    assert result.exit_code == 0, result.stderr
    [request] = server.requests
    assert request.body["contents"][-1]["parts"][0] == {"text": "compare"}
    [(first, uri, _), (second, url, pdf), (third, digest, _)] = request.media
    assert (first, second, third) == ("file", "file", "inline") and (url, pdf) == (
        "https://example.com/spec.pdf",
        "application/pdf",
    )
    assert base64.b64decode(server.file_meta[uri.partition("/v1beta/")[2]]["sha256Hash"]).hex() == sha(
        large
    ) and digest == sha(small)


def test_a_file_that_cannot_be_sent_fails_its_row_alone_before_anything_is_sent(
    tmp_path, fake_gemini, run, monkeypatch
) -> None:
    monkeypatch.setattr(pipeline, "FILES_API_MAX_BYTES", 10_000)  # a 2 GB file, as far as the check can tell
    inputs = tmp_path / "inputs"
    images(inputs / "photos", 2, small=2_000, large=20_000)
    (inputs / "photos" / "folder.png").mkdir()
    rows = [
        {"id": "fine", "prompt": "p", "files": "photos/image_000.png"},
        {"id": "missing", "prompt": "p", "files": ["photos/nope.png"]},
        {"id": "unknown", "prompt": "p", "files": "photos/data.qqq"},
        {"id": "not-taken", "prompt": "p", "files": "photos/tool.exe"},
        {"id": "folder", "prompt": "p", "files": "photos/folder.png"},
        {"id": "plain-http", "prompt": "p", "files": "http://example.com/a.png"},
        {"id": "gs-off-vertex", "prompt": "p", "files": "gs://bucket/a.png"},
        {"id": "not-names", "prompt": "p", "files": [1, 2]},
        {"id": "too-large", "prompt": "p", "files": "photos/image_001.png"},
        {"id": "outside", "prompt": "p", "files": "../secret.txt"},
        {"id": "absolute", "prompt": "p", "files": "/etc/hostname.txt"},
        {"id": "nul", "prompt": "p", "files": "photos/a\u0000b.png"},
    ]
    (inputs / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    server = fake_gemini()
    result = run(inputs)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert [r.prompt for r in server.requests] == ["p"] and server.upload_log == []
    reasons = {f["id"]: f["error"] for f in result.failures()}
    assert reasons["missing"] == "file photos/nope.png: No such file or directory (rows.jsonl:2)"
    assert "its type is unknown" in reasons["unknown"] and "does not take application/" in reasons["not-taken"]
    assert (
        "not a regular file" in reasons["folder"]
        and "https://" in reasons["plain-http"]
        and "Vertex AI" in reasons["gs-off-vertex"]
    )
    assert "not a list of file names" in reasons["not-names"] and "over the Files API's 2 GB" in reasons["too-large"]
    assert "not inside the files folder" in reasons["outside"] and "not inside the files folder" in reasons["absolute"]
    assert "not a name a file can have" in reasons["nul"]
    assert set(reasons) == {row["id"] for row in rows} - {"fine"}
    assert all(f["permanent"] for f in result.failures())


def test_an_edited_image_is_an_edited_input(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 2)
    csv_of(inputs, [("a", "describe", [pictures[0]]), ("b", "describe", [pictures[1]])])
    fake_gemini()
    assert run(inputs, "--inline-limit-mb", str(LIMIT_MB)).exit_code == 0
    pictures[1].write_bytes(pictures[1].read_bytes() + b"edited")
    server = fake_gemini()
    edited = run(inputs, "--inline-limit-mb", str(LIMIT_MB))
    assert edited.exit_code == 2 and "b is not the prompt" in edited.stderr and not server.requests


def test_after_kill_9_a_rerun_uploads_again_only_what_was_in_flight_and_leaves_nothing(
    tmp_path, fake_gemini, run
) -> None:
    """The issue's figures again: 1,000 rows, 200 images, half over a 1 MB inline limit."""
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 200, small=10_000, large=760_000)
    rows = [(f"r{i}", f"describe picture {i}", [pictures[i % 200]]) for i in range(1000)]
    csv_of(inputs, rows)
    with FakeGemini(echo, latency_s=0.05) as server:
        process = start_pipeline(tmp_path, server, "--inline-limit-mb", "1", "--workers", "8")
        assert wait_for_writes(process, 60)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    journal = [
        json.loads(line) for line in (tmp_path / "outputs" / "uploads.jsonl").read_text().splitlines() if line.strip()
    ]
    recorded = {line["sha256"] for line in journal if "uri" in line}
    in_flight = {line["uploading"] for line in journal if "uploading" in line} - recorded
    assert recorded, "the kill came before any upload: this test would prove nothing"
    rerun_server = fake_gemini()
    rerun_server.files, rerun_server.file_meta = server.files, server.file_meta  # the same project
    result = run(inputs, "--inline-limit-mb", "1", "--workers", "20", output_dir=tmp_path / "outputs")
    assert result.exit_code == 0, result.stderr
    assert set(our_uploads(rerun_server)) & recorded == set()  # nothing recorded is uploaded again
    assert (
        set(our_uploads(rerun_server)) - in_flight == {sha(p) for p in pictures[1::2]} - recorded - in_flight
    )  # only what was never uploaded, or in flight
    assert max(our_uploads(rerun_server).values()) == 1 and max(our_uploads(server).values()) == 1
    assert left_on_server(rerun_server) == []  # the kill's uploads too, found by their names
    ids = Counter(r["id"] for r in result.records())
    assert len(ids) == 1000 and set(ids.values()) == {1}
    print(
        f"\nkill -9: {len(recorded)} uploads recorded, {len(in_flight)} in flight at the kill; the rerun made {len(our_uploads(rerun_server))}"
    )


def test_batch_jobs_name_uploads_never_inline_data(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 10)
    rows = [(f"r{i}", f"describe picture {i}", [pictures[i % 10]]) for i in range(30)]
    csv_of(inputs, rows)
    server = fake_gemini()
    result = run(inputs, "--batch", "--batch-poll-s", "0.01", "--inline-limit-mb", str(LIMIT_MB))
    assert result.exit_code == 0, result.stderr
    requests = [request for job in server.batches.values() for _, request in job.requests]
    assert len(requests) == 30 and all(
        "inline_data" not in json.dumps(r) and "inlineData" not in json.dumps(r) for r in requests
    )
    assert our_uploads(server) == Counter({sha(p): 1 for p in pictures})  # small ones too: a job file carries no bytes
    by_id = {r["id"]: r["prompt"] for r in result.records()}
    assert by_id == {row_id: prompt for row_id, prompt, _ in rows} and left_on_server(server) == []


def test_offline_answers_say_what_files_came(tmp_path, run) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 2)
    csv_of(inputs, [("a", "describe", pictures)])
    result = run(inputs, "--offline", "--inline-limit-mb", str(LIMIT_MB))
    assert result.exit_code == 0, result.stderr
    [record] = result.records()
    assert "(2 files: image/png of 2008 bytes, image/png at offline:files/offline-1)" in record["response"]


def test_media_resolution_is_asked_and_is_part_of_the_jobs_identity(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 1)
    csv_of(inputs, [("a", "describe", pictures)])
    server = fake_gemini()
    assert run(inputs, "--media-resolution", "low").exit_code == 0
    assert server.requests[0].body["generationConfig"]["mediaResolution"] == "MEDIA_RESOLUTION_LOW"
    changed = run(inputs, "--media-resolution", "high")
    assert changed.exit_code == 2 and "--media-resolution changed" in changed.stderr


def test_the_sample_pictures_run_offline_and_their_images_are_not_read_as_prompts(tmp_path, run) -> None:
    shutil.copytree(ROOT / "inputs" / "pictures", tmp_path / "pictures")
    result = run(tmp_path / "pictures", "--offline")
    assert result.exit_code == 0, result.stderr
    answers = {r["id"]: r["response"] for r in result.records()}
    assert answers == {
        "red": "You said: What colour is this square? (1 file: image/png of 74 bytes)",
        "both": "You said: Which of these two squares is darker? (2 files: image/png of 74 bytes, image/png of 74 bytes)",
    }


def test_a_rerun_reuses_an_upload_until_an_hour_before_it_expires_and_uploads_it_again_after(
    tmp_path, fake_gemini, run
) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 4)  # two of them large: uploaded
    csv_of(inputs, [(f"r{i}", f"describe picture {i}", [pictures[i]]) for i in range(4)])
    server = fake_gemini(lambda request: error(503, "not today"))
    first = run(inputs, "--inline-limit-mb", str(LIMIT_MB), "--max-attempts", "1")
    assert first.exit_code == 1 and len(first.failures()) == 4  # failed, but may pass: their uploads stay
    assert left_on_server(server) and set(our_uploads(server)) == {sha(pictures[1]), sha(pictures[3])}
    journal = tmp_path / "outputs" / "uploads.jsonl"
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    for line in lines:
        if line.get("sha256") == sha(pictures[3]):
            line["expires"] = time.time() + pipeline.UPLOAD_MARGIN_S - 60  # within the last hour of its life
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rerun = fake_gemini()
    rerun.files, rerun.file_meta = server.files, server.file_meta
    second = run(inputs, "--inline-limit-mb", str(LIMIT_MB))
    assert second.exit_code == 0, second.stderr
    assert our_uploads(rerun) == Counter({sha(pictures[3]): 1})  # the other upload was used as it was
    assert left_on_server(rerun) == []


def test_a_full_disk_while_recording_an_upload_stops_the_run_in_one_line(
    tmp_path, fake_gemini, run, monkeypatch
) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 4)
    csv_of(inputs, [(f"r{i}", f"describe picture {i}", [pictures[i]]) for i in range(4)])

    real_append = pipeline.append_line

    def full(path, record, synced=True):  # the disk fills as the first upload is journaled
        if path.name == pipeline.UPLOADS_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(path, record, synced)

    monkeypatch.setattr(pipeline, "append_line", full)
    fake_gemini()
    result = run(inputs, "--inline-limit-mb", str(LIMIT_MB), "--workers", "1")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: cannot write {tmp_path / 'outputs' / 'uploads.jsonl'}: No space left on device"
    )


def test_uploads_ride_out_a_server_that_goes_away(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 40)
    csv_of(inputs, [(f"r{i}", f"describe picture {i}", [pictures[i]]) for i in range(40)])
    server = fake_gemini()
    server.behaviour = away_once(server, after=6, seconds=1.0)
    result = run(inputs, "--inline-limit-mb", str(LIMIT_MB), "--workers", "4")
    assert result.exit_code == 0, result.stderr
    assert server.gone_at is not None and server.back_at is not None  # it did go away, and came back
    assert len(result.records()) == 40 and not result.failures()
    assert set(our_uploads(server)) == {sha(p) for p in pictures[1::2]} and left_on_server(server) == []


def test_a_files_tokens_are_estimated_by_the_docs_figures(tmp_path) -> None:
    pdf = tmp_path / "three_pages.pdf"
    pdf.write_bytes(
        b"%PDF-1.4\n1 0 obj << /Type /Pages /Count 3 >>\n"
        + b"".join(b"obj << /Type /Page /Parent 1 0 R >>\n" for _ in range(3))
    )
    wav = tmp_path / "two_seconds.wav"
    header = (
        b"RIFF"
        + (36 + 64_000).to_bytes(4, "little")
        + b"WAVEfmt "
        + (16).to_bytes(4, "little")
        + bytes(8)
        + (32_000).to_bytes(4, "little")
        + bytes(8)
    )
    wav.write_bytes(header + bytes(64_000))  # 32,000 bytes a second, by its header
    note = tmp_path / "note.txt"
    note.write_text("x" * 400)
    media = pipeline.Media(pipeline.FilesFolder(tmp_path), 20).read_all(
        tuple(pipeline.media_files([str(p.name) for p in (pdf, wav, note)], tmp_path)[0])
    )
    seconds = wav.stat().st_size / 32_000  # the header's bytes count too
    assert [file.units for file in media] == [3, seconds, 100]  # pages, seconds, tokens
    prompt = pipeline.Prompt("a", "p", media=media)
    assert pipeline.media_tokens(prompt) == 3 * 560 + round(seconds * 32) + 100
    low = prompt._replace(config=pipeline.generation_config({"mediaResolution": "MEDIA_RESOLUTION_LOW"})[0])
    assert pipeline.media_tokens(low) == 3 * 280 + round(seconds * 32) + 100


def test_the_progress_counts_the_uploads(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 12)
    csv_of(inputs, [(f"r{i}", f"describe picture {i}", [pictures[i]]) for i in range(12)])
    fake_gemini(latency_s=0.05)
    result = run(inputs, "--inline-limit-mb", str(LIMIT_MB), "--workers", "1", "--progress-every-s", "0.1")
    assert result.exit_code == 0, result.stderr
    counts = [int(n) for n in re.findall(r"^\d+/12 prompts .*, (\d+) files? uploaded", result.stderr, re.MULTILINE)]
    assert counts and counts == sorted(counts) and "6 files uploaded" in result.stderr.splitlines()[-2]


def test_a_video_is_asked_about_once_the_files_api_has_processed_it(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    (inputs / "clips").mkdir(parents=True)
    (inputs / "clips" / "clip.mp4").write_bytes(bytes(30_000))
    csv_of(inputs, [("a", "what happens", [inputs / "clips" / "clip.mp4"])])
    server = fake_gemini()
    server.processing_gets = 2
    result = run(inputs, "--inline-limit-mb", str(LIMIT_MB))
    assert result.exit_code == 0, result.stderr
    [name] = list(server.file_gets)
    assert server.file_gets[name] == 2 and server.file_meta[name]["mimeType"] == "video/mp4"  # polled until ACTIVE
    [request] = server.requests
    assert request.media == (("file", server.file_meta[name]["uri"], "video/mp4"),)


def test_estimate_counts_a_pdfs_pages(tmp_path, run) -> None:
    inputs = tmp_path / "inputs"
    (inputs / "docs").mkdir(parents=True)
    (inputs / "docs" / "report.pdf").write_bytes(b"%PDF-1.4\n" + b"".join(b"<< /Type /Page >>\n" for _ in range(10)))
    csv_of(
        inputs,
        [("a", "summarise", [inputs / "docs" / "report.pdf"]), ("b", "summarise", [inputs / "docs" / "missing.pdf"])],
    )
    result = run(inputs, "--estimate", "--offline", "--media-resolution", "low")
    assert result.exit_code == 0, result.stderr
    assert ": 1 prompt (" in result.stdout  # the row naming a missing file is left out
    own = len("summarise") // 4  # the offline count: characters / 4
    assert f"input tokens   {10 * 280 + own:,}," in result.stdout  # ten pages at 280 tokens each


def test_a_rerun_reads_no_file_again_unless_it_changed(tmp_path, fake_gemini, run, monkeypatch) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 6)
    csv_of(inputs, [(f"r{i}", f"describe picture {i}", [pictures[i]]) for i in range(6)])
    fake_gemini()
    assert run(inputs, "--inline-limit-mb", str(LIMIT_MB)).exit_code == 0
    read: list[Path] = []
    real_digest = pipeline.file_digest
    monkeypatch.setattr(
        pipeline, "file_digest", lambda stream, file, size: read.append(file.path) or real_digest(stream, file, size)
    )
    again = run(inputs, "--inline-limit-mb", str(LIMIT_MB))
    assert again.exit_code == 0 and "all 6 prompts were answered before" in again.stderr
    assert read == []  # each file known by its path, size and mtime (file_digests.jsonl)
    os.utime(pictures[2], ns=(1, 1))  # touched, not edited: read again, and found the same
    assert run(inputs, "--inline-limit-mb", str(LIMIT_MB)).exit_code == 0 and read == [pictures[2]]


def test_a_journal_line_torn_by_a_kill_is_removed_before_the_next_append(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    pictures = images(inputs / "photos", 4)
    csv_of(inputs, [(f"r{i}", f"describe picture {i}", [pictures[i]]) for i in range(2)])
    fake_gemini()
    assert run(inputs, "--inline-limit-mb", str(LIMIT_MB)).exit_code == 0
    digests = tmp_path / "outputs" / pipeline.DIGESTS_FILE
    with digests.open("a") as file:
        file.write('{"path": "half a li')  # a kill in the middle of a write
    csv_of(
        inputs, [(f"r{i}", f"describe picture {i}", [pictures[i]]) for i in range(4)]
    )  # two rows more: two lines appended
    assert run(inputs, "--inline-limit-mb", str(LIMIT_MB)).exit_code == 0
    assert run(inputs, "--inline-limit-mb", str(LIMIT_MB)).exit_code == 0  # the journal reads whole again
    assert [json.loads(line)["path"] for line in digests.read_text().splitlines()] == [str(p) for p in pictures]


def test_a_row_sends_only_files_really_inside_the_files_folder_links_followed(tmp_path, fake_gemini, run) -> None:
    """Issue 33: links out of the folder (a folder link, a file link, one into /proc) and a
    FIFO fail their rows alone, naming the file; links that stay inside are answered."""
    inputs, secret = tmp_path / "inputs", tmp_path / "secret"
    secret.mkdir()
    secret_bytes = b"the neighbour's notes, never to be sent " * 20
    (secret / "notes.txt").write_bytes(secret_bytes)
    [inside] = images(inputs / "photos", 1)
    (inputs / "sub").symlink_to(secret, target_is_directory=True)  # the usual way to bring a folder in
    (inputs / "linked.png").symlink_to(secret / "notes.txt")
    (inputs / "env.png").symlink_to("/proc/self/environ")
    os.mkfifo(inputs / "pipe.png")
    (inputs / "alias.png").symlink_to("photos/image_000.png")  # stays inside: fine
    (inputs / "more").symlink_to(inputs / "photos", target_is_directory=True)
    rows = {
        "folder-link": "sub/notes.txt",
        "file-link": "linked.png",
        "proc": "env.png",
        "fifo": "pipe.png",
        "plain": "photos/image_000.png",
        "alias": "alias.png",
        "inner-folder-link": "more/image_000.png",
    }
    (inputs / "rows.jsonl").write_text(
        "".join(json.dumps({"id": k, "prompt": f"about {k}", "files": v}) + "\n" for k, v in rows.items())
    )
    server = fake_gemini()
    server.watched = [secret_bytes[:200], pipeline.api_key_from_env().encode(), b"GEMINI_API_KEY="]
    result = run(inputs)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert sorted(result.ids()) == ["alias", "inner-folder-link", "plain"]
    assert sorted(r.prompt for r in server.requests) == ["about alias", "about inner-folder-link", "about plain"]
    assert {digest for r in server.requests for _, digest, _ in r.media} == {sha(inside)}
    assert server.watched_seen == 0 and server.upload_log == []  # nothing of theirs reached the server
    reasons = {f["id"]: f["error"] for f in result.failures()}
    assert (
        reasons["folder-link"]
        == f"file sub/notes.txt: resolves outside {inputs} (to ../secret/notes.txt) (rows.jsonl:1)"
    )
    assert reasons["file-link"] == f"file linked.png: resolves outside {inputs} (to ../secret/notes.txt) (rows.jsonl:2)"
    assert reasons["proc"].startswith(f"file env.png: resolves outside {inputs} (to /proc/")
    assert reasons["fifo"] == "file pipe.png: not a regular file (rows.jsonl:4)"
    digests = [
        json.loads(line)["path"] for line in (result.output_dir / pipeline.DIGESTS_FILE).read_text().splitlines()
    ]
    assert digests == [os.path.realpath(inside)]  # by its real path, once: the links name the same file


def test_a_file_whose_bytes_do_not_match_its_size_is_not_sent() -> None:
    """With the files folder at /proc/self (a user's odd choice), the environment is inside
    it, yet its size (0) is not what it reads: refused all the same, never hashed as a file."""
    folder = pipeline.FilesFolder(Path("/proc/self"))
    media = pipeline.Media(folder, 20)
    environ = pipeline.MediaFile("environ", "text/plain", Path("/proc/self/environ"))
    with pytest.raises(pipeline.UnsendableFile, match=r"^file environ: read [\d,]+ bytes where its size says 0 "):
        media.read_all((environ,))
    assert media.hashes == {}


def test_the_files_folder_can_be_elsewhere_and_nothing_leaves_it(tmp_path, fake_gemini, run) -> None:
    inputs, photos = tmp_path / "inputs", tmp_path / "photos"
    inputs.mkdir()
    [first, second] = images(photos / "cats", 2, large=2_000)
    (tmp_path / "outside.png").write_bytes(b"\x89PNG not in the files folder")
    rows = [
        ("a", "cats/image_000.png"),
        ("b", "cats/image_001.png"),
        ("c", "../outside.png"),
        ("d", "cats/../../outside.png"),
    ]
    (inputs / "rows.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": f"describe {i}", "files": f}) + "\n" for i, f in rows)
    )
    server = fake_gemini()
    result = run(inputs, "--files-dir", str(photos))
    assert result.exit_code == 1 and sorted(result.ids()) == ["a", "b"]
    assert sorted(digest for r in server.requests for _, digest, _ in r.media) == sorted([sha(first), sha(second)])
    assert {f["id"]: "not inside the files folder" in f["error"] for f in result.failures()} == {"c": True, "d": True}


def edited_after_hashing(monkeypatch, path: Path) -> None:
    """`path` gains bytes the moment after the run has hashed it (its row read)."""
    real_read_all = pipeline.Media.read_all

    def read_all(self, media):
        read = real_read_all(self, media)
        if any(file.path == path for file in media):
            with path.open("ab") as file:
                file.write(b"edited while the run went on")
        return read

    monkeypatch.setattr(pipeline.Media, "read_all", read_all)


def test_a_file_edited_between_hashing_and_sending_is_never_sent_under_its_old_hash(tmp_path, fake_gemini, run) -> None:
    """Inline, uploaded and in a batch job: the row fails, not for good, with nothing of the
    new bytes sent or uploaded; a rerun sends the file as it is now."""
    inputs = tmp_path / "inputs"
    small, large = images(inputs / "photos", 2, small=2_000, large=30_000)
    csv_of(inputs, [("inline", "describe", [small]), ("upload", "describe", [large])])
    for flags, output in (((), "interactive"), (("--batch", "--batch-poll-s", "0.01"), "batch")):
        server = fake_gemini()
        with pytest.MonkeyPatch.context() as editing:
            for path in (small, large):
                edited_after_hashing(editing, path)
            result = run(inputs, "--inline-limit-mb", str(LIMIT_MB), *flags, output_dir=tmp_path / output)
        assert result.exit_code == 1, result.stderr
        failures = {f["id"]: f for f in result.failures()}
        assert set(failures) == {"inline", "upload"} and not any(f["permanent"] for f in failures.values())
        assert all("changed after its row was read" in f["error"] for f in failures.values())
        assert not [r for r in server.requests if r.media] and our_uploads(server) == Counter()
        again = run(inputs, "--inline-limit-mb", str(LIMIT_MB), *flags, output_dir=tmp_path / output)
        assert again.exit_code == 0, again.stderr
        assert sorted(again.ids()) == ["inline", "upload"] and not again.failures()


def test_a_file_sent_again_is_hashed_again_unless_its_stat_shows_no_write_since(tmp_path, monkeypatch) -> None:
    """The second send of an unchanged file skips the hash (its stat is the one hashed);
    a same-size edit with its mtime set back still changes its ctime, and is caught."""
    monkeypatch.setattr(pipeline, "RACY_S", -1e9)  # as if the file had been written long before it was hashed
    [photo] = images(tmp_path / "photos", 1, small=2_000)
    media = pipeline.Media(pipeline.FilesFolder(tmp_path), 20)
    [file] = media.read_all(tuple(pipeline.media_files(["photos/image_000.png"], tmp_path)[0]))
    assert media.folder.read_checked(file) == photo.read_bytes()
    hashed = []
    monkeypatch.setattr(
        pipeline.hashlib, "sha256", lambda data=b"", real=hashlib.sha256: hashed.append(data) or real(data)
    )
    assert media.folder.read_checked(file) == photo.read_bytes() and hashed == []
    before = photo.stat()
    photo.write_bytes(bytes(reversed(photo.read_bytes())))
    os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(pipeline.EditedFile, match=r"^file photos/image_000.png changed after its row was read"):
        media.folder.read_checked(file)
    assert len(hashed) == 1


def test_a_file_written_just_before_it_was_hashed_is_hashed_at_every_send(tmp_path, monkeypatch) -> None:
    """Within RACY_S of its last write a coarse clock could hide an edit: no stat is trusted."""
    [photo] = images(tmp_path / "photos", 1, small=2_000)
    media = pipeline.Media(pipeline.FilesFolder(tmp_path), 20)
    [file] = media.read_all(tuple(pipeline.media_files(["photos/image_000.png"], tmp_path)[0]))
    hashed = []
    monkeypatch.setattr(
        pipeline.hashlib, "sha256", lambda data=b"", real=hashlib.sha256: hashed.append(data) or real(data)
    )
    for _ in range(2):
        assert media.folder.read_checked(file) == photo.read_bytes()
    assert len(hashed) == 2


async def test_a_prompt_is_never_changed_its_files_read_make_a_new_one(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    media, problem = pipeline.media_files(["a.png"], tmp_path)
    assert problem is None
    prompt = pipeline.Prompt("r1", "describe", media=media)
    with pytest.raises(AttributeError):
        prompt.text = "something else"  # type: ignore[misc]
    resolved = await pipeline.Media(pipeline.FilesFolder(tmp_path), 20).resolve(prompt)
    assert resolved is not prompt and resolved.media[0].sha256 and resolved.digest
    assert prompt.media[0].sha256 == "" and prompt.digest == ""  # the prompt as read is as it was
