"""Claims of the audit trail: a chain names the line that was tampered with, participants vouch for
each other where a chain alone cannot, and appends stay one chain under concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from clinfed.audit import (
    GENESIS,
    AuditLog,
    AuditTamperedError,
    main_verify,
    payload_digest,
    payload_digest_chunks,
    verify,
)

JOB = "job-1"
SITES = ("site-1", "site-2")
ROUNDS = 2


def _update(site: str, rnd: int) -> bytes:
    return f"ciphertexts of {site} round {rnd}".encode()


def _federation(root: Path) -> dict[str, Path]:
    """A server and two sites, each in its own workspace, logging two encrypted rounds.

    Per site: job_start, 2 x (epsilon_spent, update_sent), job_end = 6 records.
    Server: job_start, 2 x (2 x update_received, aggregation), job_end = 8 records.
    """
    server = AuditLog(root / "server", "server")
    sites = {name: AuditLog(root / name, name) for name in SITES}
    server.append("job_start", job=JOB)
    for log in sites.values():
        log.append("job_start", job=JOB)
    for rnd in range(ROUNDS):
        for name, log in sites.items():
            data = _update(name, rnd)
            log.append(
                "epsilon_spent",
                job=JOB,
                round=rnd,
                epsilon=0.5 * (rnd + 1),
                delta=1e-5,
                noise_multiplier=1.1,
                sample_rate=0.01,
                steps=100,
            )
            log.append(
                "update_sent",
                job=JOB,
                round=rnd,
                site=name,
                sha256=payload_digest(data),
                bytes=len(data),
                encrypted=True,
            )
            server.append(
                "update_received",
                job=JOB,
                round=rnd,
                site=name,
                sha256=payload_digest(data),
                bytes=len(data),
                encrypted=True,
            )
        server.append("aggregation", job=JOB, round=rnd, sites=list(SITES), encrypted=True)
    for log in (server, *sites.values()):
        log.append("job_end", job=JOB)
    return {"server": server.path, **{name: log.path for name, log in sites.items()}}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _edit_field(line: bytes, key: str, value: object) -> bytes:
    record = json.loads(line)
    record[key] = value
    return json.dumps(record, separators=(",", ":")).encode()


def _assert_names(report_problems: list[str], path: Path, line: int) -> None:
    assert any(p.startswith(f"{path}:{line}: ") for p in report_problems), report_problems


def test_intact_federation_verifies(tmp_path: Path) -> None:
    _federation(tmp_path)
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert report.warnings == []
    assert (report.files, report.records) == (3, 8 + 2 * 6)


def test_records_chain_and_carry_no_payload(tmp_path: Path) -> None:
    paths = _federation(tmp_path)
    lines = _lines(paths["site-1"])
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == list(range(6))
    assert records[0]["prev"] == GENESIS
    assert all(r["prev"] == hashlib.sha256(p).hexdigest() for r, p in zip(records[1:], lines, strict=False))
    assert records[2]["sha256"] == payload_digest(_update("site-1", 0))
    assert _update("site-1", 0).decode() not in paths["site-1"].read_text()
    assert records[0]["time"].endswith("Z")


@pytest.mark.parametrize("line", [1, 3, 6])
def test_editing_a_field_names_the_line(tmp_path: Path, line: int) -> None:
    path = _federation(tmp_path)["site-1"]
    lines = _lines(path)
    lines[line - 1] = _edit_field(lines[line - 1], "job", "job-forged")
    _write(path, lines)
    report = verify(tmp_path)
    assert not report.ok
    _assert_names(report.problems, path, line)
    assert "line edited" in report.problems[0]


def test_edit_with_recomputed_hash_is_caught_by_the_next_line(tmp_path: Path) -> None:
    path = _federation(tmp_path)["site-1"]
    lines = _lines(path)
    record = json.loads(lines[1])
    record["epsilon"] = 0.01  # under-report the privacy spent, and re-seal the record
    record.pop("hash")
    record["hash"] = hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    lines[1] = json.dumps(record, separators=(",", ":")).encode()
    _write(path, lines)
    report = verify(path)
    assert report.problems == [f"{path}:3: prev hash does not match line 2 (line removed, reordered or edited)"]


def test_removing_a_line_names_the_line(tmp_path: Path) -> None:
    path = _federation(tmp_path)["site-2"]
    lines = _lines(path)
    del lines[3]
    _write(path, lines)
    report = verify(tmp_path)
    assert not report.ok
    _assert_names(report.problems, path, 4)
    assert all(p.startswith(f"{path}:4: ") for p in report.problems), report.problems  # one removal, one place
    assert f"{path}:4: seq 4 where 3 was expected (line removed, inserted or reordered)" in report.problems


def test_removing_the_first_line_is_detected(tmp_path: Path) -> None:
    path = _federation(tmp_path)["server"]
    _write(path, _lines(path)[1:])
    report = verify(path)
    _assert_names(report.problems, path, 1)


def test_swapping_two_lines_names_both(tmp_path: Path) -> None:
    path = _federation(tmp_path)["server"]
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    _write(path, lines)
    report = verify(tmp_path)
    assert not report.ok
    _assert_names(report.problems, path, 3)
    _assert_names(report.problems, path, 4)


def test_inserting_a_copied_line_names_it(tmp_path: Path) -> None:
    path = _federation(tmp_path)["site-1"]
    lines = _lines(path)
    lines.insert(3, lines[2])  # replay an update_sent
    _write(path, lines)
    report = verify(tmp_path)
    assert not report.ok
    assert all(p.startswith(f"{path}:4: ") for p in report.problems), report.problems


def test_server_receipt_with_a_different_hash_names_both_logs(tmp_path: Path) -> None:
    """Both chains stay intact; only the cross-check sees that what arrived is not what was sent."""
    root = tmp_path
    site, server = AuditLog(root / "site-1", "site-1"), AuditLog(root / "server", "server")
    site.append("update_sent", job=JOB, round=0, site="site-1", sha256=payload_digest(b"sent"), bytes=4, encrypted=True)
    server.append(
        "update_received", job=JOB, round=0, site="site-1", sha256=payload_digest(b"swapped"), bytes=7, encrypted=True
    )
    report = verify(root)
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert problem.startswith(f"{server.path}:1: ")
    assert f"{site.path}:1" in problem
    assert payload_digest(b"sent")[:16] in problem and payload_digest(b"swapped")[:16] in problem


def test_cut_site_log_is_caught_by_the_server_receipt(tmp_path: Path) -> None:
    """A chain cannot see its own tail removed; the server's receipt for the removed send can."""
    paths = _federation(tmp_path)
    path = paths["site-2"]
    _write(path, _lines(path)[:4])  # drop the last update_sent and job_end
    assert verify(path).ok  # the cut chain alone is still a valid chain
    report = verify(tmp_path)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"{paths['server']}:")
    assert "site-2's log has no such update_sent" in report.problems[0]


def test_sent_but_not_received_is_only_a_warning(tmp_path: Path) -> None:
    site = AuditLog(tmp_path / "site-1", "site-1")
    server = AuditLog(tmp_path / "server", "server")
    server.append("job_start", job=JOB)
    site.append("update_sent", job=JOB, round=0, site="site-1", sha256=payload_digest(b"x"), bytes=1, encrypted=True)
    report = verify(tmp_path)
    assert report.ok
    assert len(report.warnings) == 1 and report.warnings[0].startswith(f"{site.path}:1: ")


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    first = AuditLog(tmp_path, "site-1")
    first.append("job_start", job="a")
    first.append("job_end", job="a")
    again = AuditLog(tmp_path, "site-1")
    record = again.append("job_start", job="b")
    assert record["seq"] == 2
    assert record["prev"] == hashlib.sha256(_lines(again.path)[1]).hexdigest()
    assert again.head == (3, hashlib.sha256(_lines(again.path)[2]).hexdigest())
    report = verify(tmp_path)
    assert report.ok and report.records == 3


def test_four_threads_append_one_valid_chain(tmp_path: Path) -> None:
    logs = [AuditLog(tmp_path, "site-1"), AuditLog(tmp_path, "site-1")]  # e.g. an executor and a filter

    def work(worker: int) -> None:
        for i in range(25):
            logs[worker % 2].append("failed", job=JOB, round=i, site="site-1", reason=f"worker {worker}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(tmp_path)
    assert report.ok, report.problems[:3]
    assert report.records == 100


def _append_from_process(folder: str, worker: int) -> None:
    log = AuditLog(folder, "server")
    for i in range(20):
        log.append("refused", job=JOB, round=i, site=f"site-{worker}", reason="over budget")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_append_one_valid_chain(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_from_process, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    report = verify(tmp_path)
    assert report.ok, report.problems[:3]
    assert report.records == 40


def test_refuses_to_open_a_tampered_log(tmp_path: Path) -> None:
    path = _federation(tmp_path)["site-1"]
    lines = _lines(path)
    lines[2] = _edit_field(lines[2], "bytes", 1)
    _write(path, lines)
    before = path.read_bytes()
    with pytest.raises(AuditTamperedError, match=rf"{path}:3: record hash does not match"):
        AuditLog(tmp_path / "site-1", "site-1")
    assert path.read_bytes() == before


def test_refuses_to_append_after_the_last_line_is_edited(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "site-1")
    log.append("job_start", job=JOB)
    lines = _lines(log.path)
    lines[-1] = _edit_field(lines[-1], "job", "other")
    _write(log.path, lines)
    with pytest.raises(AuditTamperedError, match="last line: record hash does not match"):
        log.append("job_end", job=JOB)
    assert len(_lines(log.path)) == 1


def test_refuses_to_append_after_an_interrupted_write(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "site-1")
    log.append("job_start", job=JOB)
    with open(log.path, "ab") as f:
        f.write(b'{"seq":1,"ti')
    with pytest.raises(AuditTamperedError, match="incomplete"):
        log.append("job_end", job=JOB)


def test_payloads_and_reserved_keys_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "server")
    with pytest.raises(TypeError, match="never carry payloads"):
        log.append("update_received", job=JOB, data=b"weights")
    with pytest.raises(ValueError, match="clash"):
        log.append("job_start", seq=7)
    with pytest.raises(ValueError, match="participant"):
        AuditLog(tmp_path, "../server")
    assert log.path.read_bytes() == b""


def test_chunk_digest_is_deterministic_and_framed() -> None:
    assert payload_digest(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    chunks = [b"ab", b"c"]
    assert payload_digest_chunks(chunks) == payload_digest_chunks([bytearray(b"ab"), memoryview(b"c")])
    assert payload_digest_chunks([b"abc"]) != payload_digest_chunks([b"ab", b"c"])
    assert payload_digest_chunks([]) != payload_digest_chunks([b""])
    expected = hashlib.sha256((2).to_bytes(8, "big") + b"ab" + (1).to_bytes(8, "big") + b"c").hexdigest()
    assert payload_digest_chunks(chunks) == expected


def test_verify_accepts_a_file_an_audit_folder_or_a_workspace(tmp_path: Path) -> None:
    paths = _federation(tmp_path)
    assert verify(paths["site-1"]).files == 1
    assert verify(paths["server"].parent).files == 1
    assert verify(tmp_path).files == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not verify(empty).ok


def test_main_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _federation(tmp_path)
    assert main_verify(str(tmp_path)) == 0
    assert capsys.readouterr().out == "audit intact: 20 records in 3 files\n"

    path = paths["site-2"]
    lines = _lines(path)
    del lines[1]
    _write(path, lines)
    assert main_verify(str(tmp_path)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith(f"{path}:2: ") for line in out), out

    assert main_verify(str(tmp_path / "missing")) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1


def _site_with_ledger(root: Path) -> tuple[AuditLog, Path]:
    from clinfed.privacy.ledger import PrivacyLedger

    audit = AuditLog(root, "site-1")
    ledger = PrivacyLedger(root / "local" / "privacy_ledger.json", "site-1", audit=audit)
    for rnd in range(2):
        ledger.reserve(JOB, rnd, noise_multiplier=1.0, sample_rate=0.2, steps=5, run="r")
    return audit, ledger.path


def test_ledger_and_audit_agree_or_verify_names_the_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ledger = _site_with_ledger(tmp_path)
    assert verify(tmp_path).ok
    data = json.loads(ledger.read_text())
    forged = dict(data["spends"][0], job="forged-job")
    ledger.write_text(json.dumps({**data, "spends": [*data["spends"], forged]}))
    report = verify(tmp_path)
    assert [p for p in report.problems if p.startswith(f"{ledger}: 1 privacy spends in site-1's ledger have no")]
    assert main_verify(str(tmp_path)) == 1
    assert str(ledger) in capsys.readouterr().out


def test_audit_records_written_before_runs_were_logged_still_match(tmp_path: Path) -> None:
    from clinfed.audit import unmatched_spends

    spends = [{"job": JOB, "round": 0, "run": "r1"}, {"job": JOB, "round": 0, "run": "r2"}]
    records = [{"job": JOB, "round": 0}, {"job": JOB, "round": 0, "run": "r2"}]
    assert unmatched_spends(records, spends) == ([], [])
    lacking, unlogged = unmatched_spends([*records, {"job": JOB, "round": 0}], spends)
    assert len(lacking) == 1 and unlogged == []
    lacking, _ = unmatched_spends([{"job": JOB, "round": 0, "mechanism": "laplace"}], spends)
    assert len(lacking) == 1, "a laplace release is not paid for by a gaussian spend"


def test_anchors_of_an_empty_log_hold_and_malformed_or_unverifiable_anchors_are_reported(tmp_path: Path) -> None:
    server, site = AuditLog(tmp_path / "server", "server"), AuditLog(tmp_path / "site-1", "site-1")
    assert site.head == (0, GENESIS)
    server.append("anchor", peer="site-1", peer_seq=0, peer_hash=GENESIS)
    assert verify(tmp_path).ok and verify(tmp_path).warnings == []
    server.append("anchor", peer="site-9", peer_seq=3, peer_hash="ab" * 32)
    report = verify(tmp_path)
    assert report.ok and any("no audit log of site-9" in w for w in report.warnings)
    server.append("anchor", peer="site-1", peer_seq="7", peer_hash="x")
    report = verify(tmp_path)
    assert [p for p in report.problems if p.startswith(f"{server.path}:3: anchor without a valid peer")]
