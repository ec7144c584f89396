"""The deployment files (issue 15): deploy/Dockerfile, deploy/compose.yaml, deploy/k8s/.

Nothing here builds an image or starts a container (no Docker engine, registry or cluster on the
machines this runs on). What is checked, offline:

* the Kubernetes manifests against the Kubernetes JSON schemas shipped in ``kubernetes-validate``
  (strict: an unknown or misspelt field fails), and the cross-references the schemas cannot see
  (selectors, Secret keys, ``$(VAR)`` expansion, probe ports and paths, the connection budget);
* the compose file's structure, its ``${VAR}`` interpolation and ``depends_on`` conditions;
* the Dockerfile's instructions: non-root ``USER``, ``EXPOSE``, the web ``CMD``, the ``HEALTHCHECK``
  (run against a local HTTP server) and the build-time ``collectstatic`` (run as the RUN line says);
* that the environment of the compose file and of the ConfigMap passes ``manage.py check --deploy``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dj_database_url
import kubernetes_validate
import pytest
import yaml
from django.urls import resolve

BASE_DIR = Path(__file__).resolve().parent.parent
DEPLOY = BASE_DIR / "deploy"
K8S = DEPLOY / "k8s"

# The oldest Kubernetes minor still in wide use and the newest the package ships schemas for.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
SECRET_NAME = "agentflow-secrets"
SECRET_VARIABLES = {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ANTHROPIC_API_KEY"}
# PostgreSQL's default max_connections (pgvector/pgvector images and stock servers) less the three
# superuser_reserved_connections.
PG_CONNECTIONS = 100 - 3
# Measured resident memory (MiB) the limits must cover: docs/deployment.md, "Resources".
MEASURED_MIB = {
    "web": 125,  # bench/turn_sql.py --rss: at start and after a REST message
    "worker": 365 + 153 + 52,  # worker + spaCy NER model (160 MB) + a liveness `celery inspect ping`
    "beat": 134,  # VmRSS of `celery beat` after start
    "migrate": 119,  # maxrss of a manage.py command (collectstatic)
}


# --- helpers -------------------------------------------------------------------------------------


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def k8s_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == kind}


def deployment(component: str) -> dict[str, Any]:
    return k8s_kind("Deployment")[f"agentflow-{component}"]


def pod_specs() -> dict[str, dict[str, Any]]:
    """Each workload's pod spec, by component (web, worker, beat, migrate)."""
    specs = {
        name.removeprefix("agentflow-"): d["spec"]["template"]["spec"]
        for name, d in k8s_kind("Deployment").items()
    }
    specs["migrate"] = k8s_kind("Job")["agentflow-migrate"]["spec"]["template"]["spec"]
    return specs


def configmap_data() -> dict[str, str]:
    return k8s_kind("ConfigMap")["agentflow-config"]["data"]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: the ConfigMap it loads, then its own ``env`` (which wins)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "agentflow-config"
        env.update(configmap_data())
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    raise AssertionError(f"unexpected memory quantity {quantity!r}")


def millicores(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


def pool_max(env: dict[str, Any]) -> int:
    """The process's database pool size, as agentflow_project.runtime.database_settings computes it."""
    if "AGENTFLOW_DB_POOL_MAX" in env:
        return int(env["AGENTFLOW_DB_POOL_MAX"])
    return min(int(env.get("AGENTFLOW_WORKER_CONCURRENCY", 128)), 32) + 4


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == name]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` (a literal ``$``)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = variables.get(name, "")
        if op == "?" and not value:
            raise KeyError(f"{name}: {arg}")
        if op == "-" and not value:
            return arg
        return value

    return INTERPOLATION.sub(substitute, text)


def compose_environment(service: str, variables: dict[str, str]) -> dict[str, str]:
    """What a compose service's container sees: its env_file, then ``environment`` (which wins)."""
    spec = compose()["services"][service]
    env: dict[str, str] = {}
    for name in spec.get("env_file", []):
        env.update(env_file(DEPLOY / name))
    env.update({k: interpolate(str(v), variables) for k, v in spec.get("environment", {}).items()})
    return env


SAMPLE_SECRETS = {
    "DJANGO_SECRET_KEY": "k7#Rq2v!Lp9xZ_w4bN8mT1cY6uE3oH5jS0aF-gD2iK7lP9qW4eR6tY8uI0oP3aS5dF",
    "POSTGRES_PASSWORD": "0123456789abcdef0123456789abcdef",
    "REDIS_PASSWORD": "fedcba9876543210fedcba9876543210",
    "ANTHROPIC_API_KEY": "",
}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``manage.py <args>`` with the project's settings and, of our variables, only ``env``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "AGENT", "DATABASE_URL", "REDIS_URL", "ANTHROPIC_", "ALLOWED_HOSTS"))
        and k not in ("CSRF_TRUSTED_ORIGINS", "HOME")
    }
    base.update(env)
    base.update({"DJANGO_SETTINGS_MODULE": "agentflow_project.settings", "AGENTFLOW_SKIP_DOTENV": "1"})
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- Kubernetes: the schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "name,doc",
    [pytest.param(n, d, id=f"{n}:{d['kind']}") for n, d in k8s_documents() if d["kind"] != "Kustomization"],
)
def test_manifest_is_valid_against_the_kubernetes_schema(
    name: str, doc: dict[str, Any], version: str
) -> None:
    assert kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_validation_is_strict_enough_to_catch_a_misspelt_field() -> None:
    doc = json.loads(json.dumps(deployment("web")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"

    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest_but_the_example_secret_and_the_job() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    assert set(kustomization["resources"]) == manifests - {"secret.example.yaml", "migrate-job.yaml"}
    images = {spec["containers"][0]["image"].rsplit(":", 1)[0] for spec in pod_specs().values()}
    assert images == {entry["name"] for entry in kustomization["images"]}


# --- Kubernetes: what the schemas cannot see ------------------------------------------------------


def test_the_three_deployments_select_their_own_pods() -> None:
    deployments = k8s_kind("Deployment")

    assert set(deployments) == {"agentflow-web", "agentflow-worker", "agentflow-beat"}
    for doc in deployments.values():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    components = [
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for d in deployments.values()
    ]
    assert sorted(components) == ["beat", "web", "worker"]


def test_exactly_one_beat_and_no_worker_runs_an_embedded_beat() -> None:
    beat = deployment("beat")
    container = beat["spec"]["template"]["spec"]["containers"][0]

    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert container["command"] + container["args"][:3] == ["celery", "-A", "agentflow_project", "beat"]
    schedule = container["args"][container["args"].index("-s") + 1]
    assert Path(schedule).parent.as_posix() in {m["mountPath"] for m in container["volumeMounts"]}
    worker_args = deployment("worker")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-B" not in worker_args and "--beat" not in worker_args
    assert worker_args[:5] == ["-A", "agentflow_project", "worker", "-P", "threads"]


def test_the_worker_expands_only_variables_its_environment_defines() -> None:
    container = deployment("worker")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(container)
    references = re.findall(r"\$\((\w+)\)", " ".join(container["args"]))

    assert references == ["AGENTFLOW_WORKER_CONCURRENCY", "AGENTFLOW_CELERY_QUEUE"]
    assert all(name in env for name in references)
    # The -c the worker runs with is the concurrency its pool is sized from.
    assert pool_max(env) >= int(env["AGENTFLOW_WORKER_CONCURRENCY"])


def test_secrets_come_from_the_secret_and_nothing_secret_is_in_the_configmap() -> None:
    secret_keys = set(k8s_kind("Secret")[SECRET_NAME]["stringData"])

    for component, spec in pod_specs().items():
        env = container_env(spec["containers"][0])
        needed = (
            SECRET_VARIABLES if component in ("web", "worker") else SECRET_VARIABLES - {"ANTHROPIC_API_KEY"}
        )
        for name in needed:
            reference = env[name]["secretKeyRef"]
            assert reference["name"] == SECRET_NAME, (component, name)
            assert reference["key"] in secret_keys, (component, name)
    assert not SECRET_VARIABLES & set(configmap_data())
    assert not any("PASSWORD" in key or "SECRET" in key or "TOKEN" in key for key in configmap_data())


def test_pods_run_as_the_images_non_root_user_on_a_read_only_root() -> None:
    uid = int(instruction("USER")[-1].split(":")[0])

    for component, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, component
        assert spec["securityContext"]["runAsUser"] == uid, component
        container = spec["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, component
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], component
        if container["securityContext"].get("readOnlyRootFilesystem"):
            # Writes (HOME, beat's schedule) go to an emptyDir on /tmp.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], component
            assert container_env(container)["HOME"] == "/tmp", component


def test_web_probes_use_the_health_routes_on_the_served_port_with_an_allowed_host() -> None:
    container = deployment("web")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    allowed_hosts = configmap_data()["ALLOWED_HOSTS"].split(",")
    probes = {
        kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }

    assert probes["livenessProbe"]["path"] == "/api/health/live"
    assert probes["startupProbe"]["path"] == "/api/health/live"
    assert probes["readinessProbe"]["path"] == "/api/health/ready"
    # Each check of /ready is bounded by AGENTFLOW_HEALTH_TIMEOUT_SECONDS (2 s by default).
    assert container["readinessProbe"]["timeoutSeconds"] > 2
    exposed = int(instruction("EXPOSE")[0])
    for kind, probe in probes.items():
        assert ports[probe["port"]] == exposed, kind
        headers = {h["name"]: h["value"] for h in probe["httpHeaders"]}
        # Django answers 400 to a Host outside ALLOWED_HOSTS, such as the pod IP the kubelet sends.
        assert headers["Host"] in allowed_hosts, kind
        assert headers["X-Forwarded-Proto"] == "https", kind
    assert configmap_data()["DJANGO_SECURE_PROXY_SSL_HEADER"] == "X-Forwarded-Proto"


def test_every_probed_path_is_a_route_of_the_project() -> None:
    web = deployment("web")["spec"]["template"]["spec"]["containers"][0]
    paths = {web[kind]["httpGet"]["path"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    (healthcheck,) = instruction("HEALTHCHECK")
    paths |= set(re.findall(r"http://127\.0\.0\.1:\d+(/[\w/]+)", healthcheck))

    assert paths == {"/api/health", "/api/health/live", "/api/health/ready"}
    for path in sorted(paths):
        assert resolve(path).url_name, path  # raises Resolver404 for a path the project lacks


def test_the_service_reaches_the_web_pods_port() -> None:
    service = k8s_kind("Service")["agentflow-web"]
    web = deployment("web")["spec"]["template"]
    ports = {p["name"] for p in web["spec"]["containers"][0]["ports"]}

    assert service["spec"]["selector"].items() <= web["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_the_worker_probe_pings_this_worker_by_its_celery_node_name() -> None:
    container = deployment("worker")["spec"]["template"]["spec"]["containers"][0]
    command = container["livenessProbe"]["exec"]["command"]

    assert command[:2] == ["sh", "-c"]
    words = shlex.split(command[2])
    assert words[:5] == ["celery", "-A", "agentflow_project", "inspect", "ping"]
    assert words[words.index("-d") + 1] == "celery@$HOSTNAME"  # Celery's default node name: celery@%h
    assert container["livenessProbe"]["timeoutSeconds"] > int(words[words.index("-t") + 1])


def test_requests_and_limits_cover_the_measured_memory() -> None:
    for component, spec in pod_specs().items():
        resources = spec["containers"][0]["resources"]
        request, limit = mebibytes(resources["requests"]["memory"]), mebibytes(resources["limits"]["memory"])
        assert request <= limit, component
        assert request >= MEASURED_MIB[component], component
        assert limit >= 1.5 * MEASURED_MIB[component], component
        assert millicores(resources["requests"]["cpu"]) <= millicores(resources["limits"]["cpu"]), component


def test_the_connection_budget_fits_postgresql_during_a_rollout() -> None:
    """Every pod's pool at its maximum, surge pods and the migration Job included, fits max_connections."""
    total = 0
    for name, doc in k8s_kind("Deployment").items():
        strategy = doc["spec"]["strategy"]
        surge = (
            strategy.get("rollingUpdate", {}).get("maxSurge", 0) if strategy["type"] == "RollingUpdate" else 0
        )
        assert isinstance(surge, int), f"{name}: a percentage surge cannot be budgeted"
        env = container_env(doc["spec"]["template"]["spec"]["containers"][0])
        total += (doc["spec"]["replicas"] + surge) * pool_max(env)
    total += pool_max(container_env(pod_specs()["migrate"]["containers"][0]))

    assert total <= PG_CONNECTIONS, total


def test_the_configmap_environment_passes_check_deploy() -> None:
    env = {k: v for k, v in configmap_data().items() if k != "HOME"}
    env.update({"DJANGO_SECRET_KEY": SAMPLE_SECRETS["DJANGO_SECRET_KEY"]})
    env.update(
        {
            "DATABASE_URL": "postgresql://agentflow:x@127.0.0.1:1/agentflow",
            "REDIS_URL": "redis://127.0.0.1:1/0",
        }
    )

    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


# --- compose -------------------------------------------------------------------------------------


def test_compose_runs_the_five_services_and_a_one_shot_migration() -> None:
    services = compose()["services"]

    assert set(services) == {"db", "redis", "migrate", "web", "worker", "beat"}
    assert services["db"]["image"].startswith("pgvector/pgvector:")
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert services["migrate"]["restart"] == "no"
    for name in ("migrate", "web", "worker", "beat"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]).is_file()


def test_compose_runs_exactly_one_beat() -> None:
    services = compose()["services"]
    commands = {name: " ".join(map(str, spec.get("command", []))) for name, spec in services.items()}

    assert [name for name, command in commands.items() if re.search(r"celery .*\bbeat\b", command)] == [
        "beat"
    ]
    assert services["beat"]["deploy"]["replicas"] == 1
    assert " -B" not in commands["worker"] and "--beat" not in commands["worker"]
    assert "worker -P threads" in commands["worker"]


def test_compose_depends_on_conditions_name_services_that_can_meet_them() -> None:
    services = compose()["services"]

    for name, spec in services.items():
        for target, rule in spec.get("depends_on", {}).items():
            assert target in services, (name, target)
            condition = rule["condition"]
            if condition == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (name, target)
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", (name, target)
            else:
                assert condition == "service_started", (name, target)
    for name in ("web", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # The web service keeps the image's HEALTHCHECK; the others have no web server to probe.
    assert "healthcheck" not in services["web"]
    assert services["beat"]["healthcheck"] == {"disable": True}
    assert "inspect ping" in " ".join(services["worker"]["healthcheck"]["test"])


def test_compose_secrets_are_required_variables_and_nowhere_written_down() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))

    assert required == {"DJANGO_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"}
    assert set(env_file(DEPLOY / ".env.example")) >= required | {"ANTHROPIC_API_KEY"}
    assert all(value == "" for value in env_file(DEPLOY / ".env.example").values())
    settings_file = env_file(DEPLOY / "agentflow.env")
    assert not (required | SECRET_VARIABLES) & set(settings_file)
    # Without a secret the file does not start at all.
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        compose_environment("web", {**SAMPLE_SECRETS, "POSTGRES_PASSWORD": ""})


def test_compose_urls_reach_the_db_and_redis_services_with_their_passwords() -> None:
    services = compose()["services"]
    env = compose_environment("worker", SAMPLE_SECRETS)

    database = dj_database_url.parse(env["DATABASE_URL"])
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert (database["HOST"], database["PORT"]) == ("db", 5432)
    assert database["NAME"] == services["db"]["environment"]["POSTGRES_DB"]
    assert database["USER"] == services["db"]["environment"]["POSTGRES_USER"]
    assert database["PASSWORD"] == SAMPLE_SECRETS["POSTGRES_PASSWORD"]
    assert env["REDIS_URL"] == f"redis://:{SAMPLE_SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    redis_command = interpolate(" ".join(services["redis"]["command"]), SAMPLE_SECRETS)
    assert "requirepass" in redis_command and "$REDIS_PASSWORD" in redis_command
    assert SAMPLE_SECRETS["REDIS_PASSWORD"] not in redis_command  # not on the command line
    for name in ("migrate", "web", "worker", "beat"):
        assert compose_environment(name, SAMPLE_SECRETS)["DATABASE_URL"] == env["DATABASE_URL"], name


def test_compose_connection_budget_fits_the_db_max_connections() -> None:
    services = compose()["services"]
    command = services["db"]["command"]
    max_connections = int(command[command.index("-c") + 1].split("=")[1])

    pools = {
        name: pool_max(compose_environment(name, SAMPLE_SECRETS))
        for name in ("web", "worker", "beat", "migrate")
    }
    assert pools == {"web": 10, "worker": 20, "beat": 1, "migrate": 1}
    # Two web and two worker replicas (docker compose up --scale web=2 --scale worker=2).
    assert 2 * pools["web"] + 2 * pools["worker"] + pools["beat"] + pools["migrate"] <= max_connections - 3


def test_compose_worker_threads_are_the_concurrency_its_pool_follows() -> None:
    worker = compose()["services"]["worker"]
    command = interpolate(worker["command"][2], SAMPLE_SECRETS)
    env = compose_environment("worker", SAMPLE_SECRETS)

    # Expanded by the container's shell from its own environment, so -c and the pool agree.
    assert '-c "${AGENTFLOW_WORKER_CONCURRENCY:-16}"' in command
    assert pool_max(env) == int(env["AGENTFLOW_WORKER_CONCURRENCY"]) + 4


def test_the_compose_environment_passes_check_deploy() -> None:
    env = compose_environment("web", SAMPLE_SECRETS)
    # The same settings, with servers that do not answer: check --deploy connects to neither.
    env.update(
        {
            "DATABASE_URL": "postgresql://agentflow:x@127.0.0.1:1/agentflow",
            "REDIS_URL": "redis://127.0.0.1:1/0",
        }
    )

    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)

    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_and_kubernetes_agree_on_the_non_secret_settings() -> None:
    from_compose = env_file(DEPLOY / "agentflow.env")
    from_k8s = {k: v for k, v in configmap_data().items() if k != "HOME"}

    assert from_compose == from_k8s


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_base_image_and_non_root_user() -> None:
    froms = instruction("FROM")
    keywords = [keyword for keyword, _ in dockerfile_instructions()]

    assert froms == ["python:3.11-slim"]
    user = instruction("USER")[-1]
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()
    # No RUN after the switch: nothing at run time happens as root.
    assert "RUN" not in keywords[keywords.index("USER") :]
    assert f"--uid {user.split(':')[0]}" in next(r for r in instruction("RUN") if "useradd" in r)


def test_dockerfile_bakes_in_no_secret_and_no_server() -> None:
    env_lines = " ".join(instruction("ENV"))

    for name in (*SECRET_VARIABLES, "REDIS_PASSWORD", "POSTGRES_PASSWORD"):
        assert name not in env_lines
    assert "AGENTFLOW_SKIP_DOTENV=true" in env_lines
    assert "AGENTFLOW_DATA_DIR=/var/lib/agentflow" in env_lines


def test_dockerfile_copies_every_package_of_the_distribution() -> None:
    copied = {args.split()[0] for args in instruction("COPY")}
    packages = {
        p.parent.name for p in BASE_DIR.glob("*/__init__.py") if p.parent.name not in ("tests", "bench")
    }
    ignored = {line.strip() for line in (BASE_DIR / ".dockerignore").read_text().splitlines()}

    assert packages <= copied
    assert {"requirements.txt", "manage.py"} <= copied
    for source in copied:
        assert (BASE_DIR / source).exists(), source
        assert source not in ignored, source
    assert {".venv", ".data", ".git", ".env", "**/__pycache__"} <= ignored


def test_dockerfile_cmd_is_the_web_server_on_the_exposed_port() -> None:
    (cmd,) = instruction("CMD")
    argv = json.loads(cmd)  # exec form: daphne is PID 1 and receives SIGTERM
    (exposed,) = instruction("EXPOSE")

    assert argv[:3] == ["python", "-m", "daphne"]
    endpoint = argv[argv.index("-e") + 1]
    assert f"tcp:port={exposed}:" in endpoint and ":interface=0.0.0.0" in endpoint
    assert "--proxy-headers" in argv
    assert int(argv[argv.index("--websocket_connect_timeout") + 1]) >= 30  # as runtime.web_command
    module, _, attribute = argv[-1].partition(":")
    assert (module, attribute) == ("agentflow_project.asgi", "application")
    ports = {
        c["containerPort"] for c in deployment("web")["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports == {int(exposed)}
    assert compose()["services"]["web"]["ports"][0].endswith(f":{exposed}")


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path, **dict(self.headers)})
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    _Health.seen, _Health.status = [], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], _Health
    server.shutdown()
    server.server_close()


def healthcheck_argv(port: int) -> list[str]:
    (healthcheck,) = instruction("HEALTHCHECK")
    options, _, cmd = healthcheck.partition(" CMD ")
    argv = json.loads(cmd)
    assert "--timeout=5s" in options.split()
    assert argv[:2] == ["python", "-c"]
    # The image's port, swapped for this test's server.
    (exposed,) = instruction("EXPOSE")
    assert f"http://127.0.0.1:{exposed}/api/health'" in argv[2]
    return [sys.executable, "-c", argv[2].replace(f":{exposed}/", f":{port}/")]


def test_healthcheck_passes_on_200_with_an_allowed_host(health_server: tuple[int, type[_Health]]) -> None:
    port, handler = health_server

    result = subprocess.run(healthcheck_argv(port), capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    (request,) = handler.seen
    assert request["path"] == "/api/health"
    assert request["Host"] in env_file(DEPLOY / "agentflow.env")["ALLOWED_HOSTS"].split(",")
    assert request["X-Forwarded-Proto"] == "https"


def test_healthcheck_fails_on_503(health_server: tuple[int, type[_Health]]) -> None:
    port, handler = health_server
    handler.status = 503

    result = subprocess.run(healthcheck_argv(port), capture_output=True, text=True, timeout=30)

    assert result.returncode == 1
    assert "HTTP Error 503" in result.stderr


def test_build_time_collectstatic_runs_without_any_server(tmp_path: Path) -> None:
    """The Dockerfile's collectstatic line, as written, with its placeholder environment only."""
    (line,) = [r for r in instruction("RUN") if "collectstatic" in r]
    words = shlex.split(line.split("&&")[0])
    placeholders = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
    command = [w for w in words if w not in {f"{k}={v}" for k, v in placeholders.items()}]
    assert command == ["python", "manage.py", "collectstatic", "--noinput"]
    assert set(placeholders) == {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"}

    result = manage("collectstatic", "--noinput", env={**placeholders, "AGENTFLOW_DATA_DIR": str(tmp_path)})

    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "static" / "admin" / "css" / "base.css").is_file()
    assert (tmp_path / "static" / "agentflow" / "widget.js").is_file()
    # Neither embedded server was started or prepared (no Valkey password, no PostgreSQL folder).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["static"]
