"""deploy/kubernetes/: valid against the Kubernetes schemas (offline, strict), and saying what the tool needs.

The schemas are kubernetes-validate's own copies, so no cluster or network is needed. Beyond the schema: every
pod runs a command the CLI takes, stops within its grace period, reads its secrets from Secrets, runs as the
image's non-root user on a read-only root, and the fleet's Job and the nightly CronJob are shaped as documented.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from backfill.cli import main
from backfill.config import SPECS, Settings, environment_warnings, load_settings

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes the manifests are for (podFailurePolicy is stable from 1.31), and the newest known.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
# Where --stop-timeout isn't given, its default: the run's bounded stop (issue 17) defaults to 20 s.
STOP_TIMEOUT = float(getattr(Settings, "stop_timeout", 20.0))
STOP_BOUND = 5.0  # a stop ends within --stop-timeout + 5 s of the signal, whatever the API does
SECRET_VARIABLES = {"SMILE_API_KEY", "SMILE_PARTNER_ID", "PGPASSWORD"}


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            yield f"{path.name}: {document['kind']}", document


DOCUMENTS = dict(documents())


def job_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = document["spec"]
    return spec["jobTemplate"]["spec"] if document["kind"] == "CronJob" else spec


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job_spec(document)["template"]["spec"]
    return spec


def container(document: dict[str, Any]) -> dict[str, Any]:
    [only] = pod_spec(document)["containers"]
    assert only["name"] == "backfill"
    return dict(only)


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_the_manifests_are_a_fleets_job_and_a_nightly_cronjob() -> None:
    kinds = sorted(document["kind"] for document in DOCUMENTS.values())
    assert kinds == ["CronJob", "Job"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_each_manifest_is_valid_against_the_kubernetes_schemas(name: str, version: str) -> None:
    kubernetes_validate.validate(DOCUMENTS[name], version, strict=True)


def test_the_validation_is_strict_enough_to_catch_a_misspelt_field() -> None:
    wrong = copy.deepcopy(DOCUMENTS["fleet-job.yaml: Job"])
    wrong["spec"]["paralellism"] = wrong["spec"].pop("parallelism")
    with pytest.raises(kubernetes_validate.ValidationError, match="paralellism"):
        kubernetes_validate.validate(wrong, VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_each_pod_runs_a_command_the_cli_takes_with_settings_that_load(name: str) -> None:
    args = container(DOCUMENTS[name])["args"]
    command = main.commands[args[0]]
    params = command.make_context(args[0], list(args[1:])).params  # raises on an unknown flag or a bad value
    flags = {key: value for key, value in params.items() if key in SPECS or key == "checkpoint"}
    settings = load_settings(None, {"SMILE_PARTNER_ID": "085", "SMILE_API_KEY": "k"}, flags)
    assert settings.ledger_url is not None  # a PostgreSQL ledger: pods come and go, the ledger stays
    assert settings.log_format == "json"  # one object a line, for the cluster's log pipeline
    env = {variable["name"] for variable in container(DOCUMENTS[name])["env"]}
    assert not environment_warnings(dict.fromkeys(env, "x"))  # no BACKFILL_* name the tool would ignore


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_each_pod_stops_cleanly_within_its_grace_period(name: str) -> None:
    pod, args = pod_spec(DOCUMENTS[name]), container(DOCUMENTS[name])["args"]
    stop_timeout = float(option(args, "--stop-timeout") or STOP_TIMEOUT)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= stop_timeout + STOP_BOUND  # SIGKILL never comes before the outputs are written
    assert grace <= stop_timeout + 15  # and a stop isn't waited for much longer than it can take
    assert pod["restartPolicy"] == "Never"  # a new pod resumes from the ledger; podFailurePolicy needs it


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_each_pod_gets_its_secrets_from_a_secret_and_runs_unprivileged(name: str) -> None:
    pod, box = pod_spec(DOCUMENTS[name]), container(DOCUMENTS[name])
    given = {variable["name"]: variable for variable in box["env"]}
    assert set(given) >= SECRET_VARIABLES
    for variable in SECRET_VARIABLES:
        assert "value" not in given[variable] and given[variable]["valueFrom"]["secretKeyRef"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert box["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert box["resources"]["requests"]["memory"] and box["resources"]["limits"]["memory"]
    # The only places a run writes: its output folder, and temporary files.
    writable = {m["mountPath"] for m in box["volumeMounts"] if not m.get("readOnly")}
    assert writable == {option(box["args"], "--out"), "/tmp"}


def test_a_failure_that_another_pod_cant_fix_fails_the_job_at_once() -> None:
    for document in DOCUMENTS.values():
        rules = job_spec(document)["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert [r["onExitCodes"]["values"] for r in fail] == [[2, 70]]
        ignored = [r for r in rules if r["action"] == "Ignore"]
        assert ignored[0]["onPodConditions"][0]["type"] == "DisruptionTarget"


def test_the_fleet_is_a_work_queue_and_the_nightly_run_never_overlaps_itself() -> None:
    fleet = DOCUMENTS["fleet-job.yaml: Job"]["spec"]
    assert fleet["parallelism"] > 1 and "completions" not in fleet  # every pod claims until no row is left
    nightly = DOCUMENTS["nightly-cronjob.yaml: CronJob"]["spec"]
    assert nightly["concurrencyPolicy"] == "Forbid"
    assert job_spec(DOCUMENTS["nightly-cronjob.yaml: CronJob"])["activeDeadlineSeconds"] > 0


def test_the_image_runs_as_the_user_the_pods_ask_for_with_the_postgresql_ledger() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    [user] = re.findall(r"^USER (\d+)", dockerfile, re.M)
    assert {pod_spec(d)["securityContext"]["runAsUser"] for d in DOCUMENTS.values()} == {int(user)}
    assert "[postgres]" in dockerfile and 'ENTRYPOINT ["backfill"]' in dockerfile
    images = {container(d)["image"] for d in DOCUMENTS.values()}
    assert len(images) == 1 and next(iter(images)) in dockerfile  # the tag the build line gives it
