"""Claims of a real deployment, checked on this machine's loopback with real FLARE processes (no mocks).

One federation for the module: `provisioning/localhost.yml` provisioned into a temporary folder
(server `localhost`, site-1..3, admins with the project_admin / lead / member roles), started with
`clinfed.deploy.federation.up`, jobs submitted through FLARE's API as those admins, and stopped
with `down`. The kits carry no CKKS key: `up` has site-1 make the key pair and seal it to the
other sites' kit certificates (the key_exchange job). The tests run in file order and build on
each other (the site added in the last training test joins the federation the first ones used
and receives the key the same way).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import tenseal as ts
from nvflare.lighter.utils import verify_folder_signature

from clinfed.deploy import federation
from clinfed.deploy.provision import add_site, provision
from clinfed.deploy.submit import SubmitRefused, submit
from clinfed.keys.exchange import allow_recipient_certificate

REPO = Path(__file__).resolve().parents[2]
PROJECT = REPO / "provisioning" / "localhost.yml"
SITES = ["site-1", "site-2", "site-3"]
ADMINS = {"admin@clinfed.local": "project_admin", "lead@clinfed.local": "lead", "member@clinfed.local": "member"}
PORTS = (18102, 18103)
# one provisioned federation at a time on these ports: under `pytest -n`, one worker runs them in turn
pytestmark = pytest.mark.xdist_group("loopback_federation")


def _ledger_spends(kit: Path) -> int:
    path = kit / "local" / "privacy_ledger.json"
    return len(json.loads(path.read_text())["spends"]) if path.exists() else 0


def _all_processes(kits: Path) -> list[psutil.Process]:
    """What down() must stop: the recorded participants, their process trees, and job processes of these kits."""
    procs = federation._tree(federation._read_pids(kits))
    return [p for p in procs if p.is_running()]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    for port in PORTS:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} on 127.0.0.1 is in use; localhost.yml's federation needs it")
    return provision(PROJECT, tmp_path_factory.mktemp("provision"))


@pytest.fixture(scope="module")
def fed(kits):
    start = time.monotonic()
    pids = federation.up(kits, timeout=180)
    assert set(pids) == {"localhost", *SITES}
    print(f"federation up in {time.monotonic() - start:.1f}s")
    try:
        yield kits
    finally:
        federation.down(kits)  # a no-op when the last test already stopped it


# --- the filter on its own (fast) ------------------------------------------------------------------
def test_privacy_filter_passes_ciphertexts_and_metrics_and_blocks_plaintext_weights():
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.fl_exception import UnsafeJobError
    from nvflare.apis.shareable import make_reply
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from clinfed.fl.payload import encrypted_params
    from clinfed.fl.privacy_filter import RequireEncryptedUpdates

    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-3", private=False, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, "train", private=False, sticky=False)
    f = RequireEncryptedUpdates()
    ok = [
        FLModelUtils.to_shareable(FLModel(params=encrypted_params([b"ct"], "{}", "fp"))),
        FLModelUtils.to_shareable(FLModel(metrics={"auc": 0.9})),
        FLModelUtils.to_shareable(FLModel(params={}, meta={"status": "refused"})),  # a refusal carries nothing
        make_reply(ReturnCode.EXECUTION_EXCEPTION),
    ]
    for s in ok:
        assert f.process(s, ctx) is s
    plain = FLModelUtils.to_shareable(FLModel(params={"w": np.zeros(3), "b": np.zeros(1)}))
    with pytest.raises(UnsafeJobError, match=r"site-3: privacy policy: task 'train' result WEIGHTS holds 2 plaintext"):
        f.process(plain, ctx)


@pytest.mark.parametrize("project", ["localhost.yml", "consortium.yml"])
def test_project_files_leave_the_ckks_key_to_the_hospitals(project, tmp_path):
    """No HEBuilder (it would make every hospital's secret key at the operator); kits signed by clinfed's builder."""
    import yaml

    from clinfed.deploy.provision import HE_BUILDER_PATH, load_project

    builders = yaml.safe_load((REPO / "provisioning" / project).read_text())["builders"]
    paths = [b["path"] for b in builders]
    assert HE_BUILDER_PATH not in paths
    assert paths.index("clinfed.deploy.builder.ClinfedKitBuilder") < paths.index(
        "nvflare.lighter.impl.signature.SignatureBuilder"
    )
    with_he = yaml.safe_load((REPO / "provisioning" / project).read_text())
    with_he["builders"].insert(3, {"path": HE_BUILDER_PATH, "args": {}})
    (tmp_path / project).write_text(yaml.safe_dump(with_he))
    with pytest.raises(ValueError, match=r"remove nvflare.lighter.impl.he.HEBuilder: it would generate every hospital"):
        load_project(tmp_path / project)


def test_site_template_admits_flares_default_classes_and_clinfed_only():
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    resources = json.loads((REPO / "workspace_templates" / "resources.json").read_text())
    assert resources["class_allow_list"] == [*DEFAULT_CLASS_ALLOW_LIST, "clinfed."]
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert resources["clinfed"]["require_encryption"] is True


# --- provisioning ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_provisioning_issues_signed_kits_without_any_ckks_key(kits):
    from nvflare.apis.workspace import Workspace
    from nvflare.private.fed.app.fl_conf import create_privacy_manager

    from clinfed.fl.privacy_filter import RequireEncryptedUpdates

    found = {k.name: k.role for k in federation.find_kits(kits)}
    assert found == {"localhost": "server", **dict.fromkeys(SITES, "client"), **dict.fromkeys(ADMINS, "admin")}
    for name in found:
        startup = kits / name / "startup"
        assert (startup / "signature.json").is_file(), name
        assert verify_folder_signature(str(startup), str(startup / "rootCA.pem"), True, "signature.json"), name
    for admin, role in ADMINS.items():  # FLARE puts the role in the certificate the server authorises
        assert _cert_subject(kits / admin / "startup" / "client.crt") == {"CN": admin, "role": role}, admin

    # The operator keeps everything under the provisioning folder (kits, root CA state): no CKKS key at all.
    assert not list(kits.parents[1].rglob("*.tenseal")), "provisioning must not make any CKKS context"
    server = kits / "localhost"
    policy = json.loads((server / "local" / "resources.json").read_text())
    assert "clinfed." in policy["class_allow_list"]

    for site in SITES:
        kit = kits / site
        for name in ("resources.json", "privacy.json", "authorization.json"):
            assert (kit / "local" / name).read_bytes() == (REPO / "workspace_templates" / name).read_bytes()
        # FLARE itself parses the site's privacy.json: the default scope carries clinfed's filter.
        scope = create_privacy_manager(Workspace(str(kit)), names_only=False).get_scope("")
        filters = scope.task_result_filters["out"]
        assert [type(f) for f in filters] == [RequireEncryptedUpdates]


def _cert_subject(path: Path) -> dict[str, str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    subject = x509.load_pem_x509_certificate(path.read_bytes()).subject
    return {
        "CN": subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
        "role": subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME)[0].value,
    }


def _fingerprint(path: Path, private: bool) -> str:
    from clinfed.he.context import context_fingerprint, load_server_context, load_site_context

    return context_fingerprint(load_site_context(path) if private else load_server_context(path))


def _audit(kit: Path, event: str) -> list[dict]:
    lines = [json.loads(line) for p in (kit / "audit").glob("*.jsonl") for line in p.read_text().splitlines()]
    return [r for r in lines if r.get("event") == event]


# --- the key: made by a hospital, shared with hospitals only ---------------------------------------
@pytest.mark.slow
def test_up_has_a_hospital_make_the_key_and_seal_it_to_the_other_sites(fed):
    server_file = fed / "localhost" / "local" / "server_context.tenseal"
    assert not ts.context_from(server_file.read_bytes()).is_private(), "the server holds the public context only"
    fingerprint = _fingerprint(server_file, private=False)
    assert not fingerprint.startswith("params-only:"), "a real key fingerprint (public key), not parameters only"
    for site in SITES:
        ctx_file = fed / site / "local" / "client_context.tenseal"
        assert ctx_file.stat().st_mode & 0o777 == 0o600, "the secret key is readable by its owner only"
        assert ts.context_from(ctx_file.read_bytes()).is_private()
        assert _fingerprint(ctx_file, private=True) == fingerprint, f"{site}: one federation, one key"
    assert not list((fed / "localhost").rglob("client_context.tenseal"))
    # site-1 made it and issued it to the two others; each of them recorded where its key came from.
    assert [r["site"] for r in _audit(fed / "site-1", "key_issued")] == ["site-2", "site-3"]
    for site in ("site-2", "site-3"):
        (received,) = _audit(fed / site, "key_received")
        assert (received["sender"], received["fingerprint"]) == ("site-1", fingerprint)
    assert [r["fingerprint"] for r in _audit(fed / "localhost", "server_context")] == [fingerprint]


# --- running jobs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_lead_submits_an_encrypted_dp_job_that_completes_with_auc_095(fed, tmp_path):
    out = tmp_path / "bc"
    start = time.monotonic()
    result = submit("breast_cancer_dp", fed / "lead@clinfed.local", wait=True, out=out, rounds=3, timeout=600)
    print(f"breast_cancer_dp, 3 rounds, deployed: {time.monotonic() - start:.1f}s")
    assert result.status == "FINISHED:COMPLETED"
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["encrypted"] is True
    assert summary["sites"] == SITES
    assert summary["rounds_completed"] == 3
    assert all(e["status"] == "ok" for r in summary["rounds"] for e in r["sites"].values())
    assert summary["final"]["metrics"]["auc"] >= 0.95
    assert all(0 < p["epsilon"] <= 3.0 * 1.02 for p in summary["privacy"].values())
    # What the server keeps of the job (FLARE zips the run folder into its job store): ciphertexts only.
    stored = zipfile.ZipFile(fed / "localhost" / "storage" / "jobs" / result.job_id / "workspace").namelist()
    assert "global_model.ckks.json" in stored
    assert not [n for n in stored if n.endswith((".npz", ".pt", ".pth", ".npy"))]
    assert not list((fed / "localhost").rglob("client_context.tenseal"))


@pytest.mark.slow
def test_cohort_analytics_run_as_deployed_jobs(fed, tmp_path):
    """cohort_stats (encrypted sums the server only adds) and psi_linkage (FLARE's DH-PSI) as jobs."""
    lead = fed / "lead@clinfed.local"
    stats = submit("cohort_stats", lead, wait=True, out=tmp_path / "stats", timeout=600)
    assert stats.status == "FINISHED:COMPLETED"
    assert stats.summary["encrypted"] is True
    counts = {group: next(iter(features.values()))["count"] for group, features in stats.summary["statistics"].items()}
    assert counts == {"all": 569, "malignant": 212, "benign": 357}
    psi = submit("psi_linkage", lead, wait=True, out=tmp_path / "psi", timeout=600)
    assert psi.status == "FINISHED:COMPLETED"
    assert psi.summary["psi"]["intersection_size"] == psi.summary["psi"]["expected_intersection_size"] == 193
    assert set(psi.summary["psi"]["per_site"].values()) == {193}


@pytest.mark.slow
def test_a_member_cannot_submit(fed):
    with pytest.raises(SubmitRefused, match=r"member@clinfed.local may not submit jobs here: .*submit_job"):
        submit("breast_cancer_dp", fed / "member@clinfed.local", rounds=1)
    # The command line says the same in one line and exits 1.
    proc = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "submit", "breast_cancer_dp", "--kit", str(fed / "member@clinfed.local")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "clinfed submit: member@clinfed.local may not submit jobs here: "
        "user 'member@clinfed.local' is not authorized for 'submit_job'"
    ]


@pytest.mark.slow
def test_a_plaintext_job_is_refused_by_every_site_before_training(fed, tmp_path):
    before = {site: _ledger_spends(fed / site) for site in SITES}
    result = submit("breast_cancer_dp", fed / "lead@clinfed.local", wait=True, out=tmp_path, rounds=1, encrypt=False)
    # FLARE deploys and runs the job; every site refuses it at admission (require_encryption), nothing trains.
    assert result.status == "FINISHED:COMPLETED"
    summary = result.summary
    assert summary["encrypted"] is False
    assert summary["rounds_completed"] == 0
    assert not [e for r in summary["rounds"] for e in r["sites"].values() if e.get("bytes_sent")]
    for site in SITES:
        entry = summary["admission"][site]
        assert entry["status"] == "refused"
        assert entry["reason"] == f"{site}: local privacy policy requires encrypted updates; this job sends plaintext"
    assert summary["final"]["metrics"] == {}
    assert {site: _ledger_spends(fed / site) for site in SITES} == before, "no site spent privacy budget"


@pytest.mark.slow
def test_the_privacy_scope_blocks_a_plaintext_update_even_when_the_executor_would_send_it(fed, tmp_path):
    """Every hospital turns `require_encryption` off (so the job passes admission and its >= 3-site floor);
    their privacy.json scope still stops the plaintext update at the boundary: FLARE drops the result,
    marks the job unsafe at the site and the server aborts the job."""
    policies = {site: fed / site / "local" / "resources.json" for site in SITES}
    originals = {site: path.read_text() for site, path in policies.items()}
    for site, path in policies.items():
        edited = json.loads(originals[site])
        edited["clinfed"]["require_encryption"] = False
        path.write_text(json.dumps(edited, indent=2))
    try:
        result = submit(
            "breast_cancer_dp", fed / "lead@clinfed.local", wait=True, out=tmp_path, rounds=1, encrypt=False
        )
    finally:
        for site, path in policies.items():
            path.write_text(originals[site])
    assert result.status == "FINISHED:EXECUTION_EXCEPTION"
    assert result.summary["rounds_completed"] == 0
    assert not [e for r in result.summary["rounds"] for e in r["sites"].values() if e.get("status") == "ok"]
    server_log = (result.result_dir / "workspace" / "log.txt").read_text()
    blocked = re.findall(r"fatal return code UNSAFE_JOB from client (site-\d)", server_log)
    assert blocked, "the server saw a site's privacy filter mark the job unsafe"
    site_log = (fed / blocked[0] / result.job_id / "log.txt").read_text()
    assert f"{blocked[0]}: privacy policy: task 'train' result WEIGHTS holds" in site_log
    received = [
        json.loads(line)
        for line in (fed / "localhost" / "audit" / "server.jsonl").read_text().splitlines()
        if '"update_received"' in line
    ]
    plaintext = [r for r in received if r.get("job") == "breast_cancer_dp" and r.get("encrypted") is False]
    assert not plaintext, "no plaintext model update reached the server"


@pytest.mark.slow
def test_an_added_site_joins_the_running_federation_and_trains(fed, tmp_path):
    project_out = fed.parents[1]
    before = {p: p.read_bytes() for site in SITES for p in (fed / site / "startup").iterdir()}
    kit = add_site("site-4", PROJECT, project_out)
    assert kit == fed / "site-4"
    assert sorted(p.name for p in (fed.parent).glob("prod_*")) == ["prod_00"], "no re-issued copies left around"
    assert {p: p.read_bytes() for p in before} == before, "existing kits untouched"
    startup = kit / "startup"
    assert not list(kit.rglob("*.tenseal")), "the new kit carries no key either"
    assert verify_folder_signature(str(startup), str(startup / "rootCA.pem"), True, "signature.json")
    keys = {site: (fed / site / "local" / "client_context.tenseal") for site in SITES}
    held = {site: (path.read_bytes(), path.stat().st_mtime_ns) for site, path in keys.items()}
    fingerprint = _fingerprint(fed / "localhost" / "local" / "server_context.tenseal", private=False)

    # adding a hospital takes a hospital's action: the key holder's admin lists site-4's certificate
    allow_recipient_certificate(fed / "site-1", "site-4", (startup / "client.crt").read_bytes())
    pids = federation.up(fed, timeout=180)  # starts site-4, then the key exchange gives it the key
    assert set(pids) == {"localhost", *SITES, "site-4"}
    assert {site: (p.read_bytes(), p.stat().st_mtime_ns) for site, p in keys.items()} == held, "others keep theirs"
    new_key = kit / "local" / "client_context.tenseal"
    assert new_key.stat().st_mode & 0o777 == 0o600
    assert _fingerprint(new_key, private=True) == fingerprint, "the federation's key, not a new one"
    (received,) = _audit(kit, "key_received")
    assert (received["sender"], received["fingerprint"]) == ("site-1", fingerprint)
    assert _audit(fed / "site-1", "key_issued")[-1]["site"] == "site-4"
    result = submit("breast_cancer_dp", fed / "lead@clinfed.local", wait=True, out=tmp_path, rounds=2, timeout=600)
    assert result.status == "FINISHED:COMPLETED"
    summary = result.summary
    assert summary["sites"] == [*SITES, "site-4"]
    assert summary["rounds_completed"] == 2 and summary["encrypted"] is True
    assert all(r["sites"]["site-4"]["status"] == "ok" for r in summary["rounds"])
    assert "site-4" in summary["final"]["per_site"]
    assert summary["final"]["metrics"]["auc"] >= 0.95


ALL_SITES = [*SITES, "site-4"]  # from the test above on


def _edited_job(folder: Path, **dp_edits) -> Path:
    """Export breast_cancer_dp and edit its client config the way a lead could before submitting it."""
    from clinfed.jobs import load_job

    recipe = load_job("breast_cancer_dp").make_recipe(sites=len(ALL_SITES), rounds=2)
    recipe.export(str(folder))
    config = folder / recipe.name / "app" / "config" / "config_fed_client.json"
    data = json.loads(config.read_text())
    data["executors"][0]["executor"]["args"]["dp_args"].update(dp_edits)
    config.write_text(json.dumps(data, indent=2))
    return folder / recipe.name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"enabled": False}, "dp_args.enabled"),
        ({"target_epsilon": 1e6}, "dp_args.target_epsilon"),
        ({"delta": 0.5}, "dp_args.delta"),
    ],
    ids=["dp-off", "epsilon-1e6", "delta-0.5"],
)
def test_a_leads_edited_job_that_weakens_dp_trains_at_no_site(fed, tmp_path, edit, named):
    before = {site: _ledger_spends(fed / site) for site in ALL_SITES}
    result = submit(_edited_job(tmp_path / "job", **edit), fed / "lead@clinfed.local", wait=True, out=tmp_path / "out")
    assert result.status == "FINISHED:COMPLETED"
    summary = result.summary
    assert summary["rounds_completed"] == 0 and summary["rounds"] == []
    for site in ALL_SITES:
        verdict = summary["admission"][site]
        assert verdict["status"] == "refused" and verdict["reason"].startswith(f"{site}: ")
        assert named in verdict["reason"], verdict["reason"]
    assert {site: _ledger_spends(fed / site) for site in ALL_SITES} == before, "no site spent privacy budget"


def test_a_two_site_job_is_refused_up_front(fed):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clinfed.cli",
            "submit",
            "breast_cancer_dp",
            "--kit",
            str(fed / "lead@clinfed.local"),
            "--sites",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "needs at least 3 sites" in line


@pytest.mark.slow
def test_a_site_whose_ledger_was_deleted_refuses_and_the_others_train(fed, tmp_path):
    ledger = fed / "site-2" / "local" / "privacy_ledger.json"
    assert _ledger_spends(fed / "site-2") > 0, "site-2 spent in the jobs above"
    kept = ledger.read_bytes()
    ledger.unlink()
    try:
        result = submit("breast_cancer_dp", fed / "lead@clinfed.local", wait=True, out=tmp_path, rounds=1, timeout=600)
    finally:
        ledger.write_bytes(kept)
    summary = result.summary
    verdict = summary["admission"]["site-2"]
    assert verdict["status"] == "refused" and "ledger" in verdict["reason"], verdict
    assert summary["rounds_completed"] == 1, "the three other sites still make a round"
    trained = {s for s, e in summary["rounds"][0]["sites"].items() if e["status"] == "ok"}
    assert trained == {"site-1", "site-3", "site-4"}


@pytest.mark.slow
def test_down_stops_every_process_including_a_running_job(fed):
    result = submit("breast_cancer_dp", fed / "lead@clinfed.local", wait=False, rounds=5)
    assert result.status == "SUBMITTED"
    deadline = time.monotonic() + 120
    sites = {name: rec for name, rec in federation._read_pids(fed).items() if rec["role"] == "client"}
    while time.monotonic() < deadline:  # wait until every site runs the job in a process of its own
        if all(federation._process(rec).children(recursive=True) for rec in sites.values()):
            break
        time.sleep(1)
    else:
        pytest.fail("the job never started at every site")
    procs = _all_processes(fed)
    assert len(procs) > 1 + len(sites), "job processes are part of what down() stops"
    stopped = federation.down(fed)
    assert {p.pid for p in procs} <= set(stopped)
    assert not [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (fed / federation.PID_FILE).exists()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", PORTS[0])) != 0, "the server's port is free again"
