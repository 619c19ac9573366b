"""k8s/: the Kubernetes manifests against the API's schemas, against each other,
and against the gateway's configuration.

No cluster runs here, so the manifests are validated, not applied (STYLE §9):

- every document against the Kubernetes OpenAPI schemas, strictly (an unknown
  field is an error, as `kubectl apply --validate=strict` makes it), with the
  schemas kubernetes-validate ships;
- the references between them: Service and PodDisruptionBudget selectors,
  targetPorts, the ConfigMaps, Secrets and claims a pod uses, the kustomization;
- every smtpgw container runs one real role with the mounted configuration,
  exposes the ports that configuration listens on, and k8s/smtpgw.toml passes the
  validation `smtpgw check-config` runs, naming only hosts the manifests define;
- what the design needs of them: the client's address kept at the receiver,
  one read-write-many volume for what the updater installs, mounted whole
  (its symlink swap needs the link and its versions in one directory), one
  writer for the quarantine and the updater, hardened containers.
"""

from __future__ import annotations

import posixpath
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from services.runner import ROLES
from shared.config import Config, load_config
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
CONFIG_FILE = K8S / "smtpgw.toml"
NAMESPACE = "smtpgw"
CONFIG_DIR = "/etc/smtpgw"
CONFIG_PATH = f"{CONFIG_DIR}/smtpgw.toml"
# clamd runs from the smtpgw image through deploy/clamd-entrypoint.sh (copied to /opt/smtpgw),
# which has it load its signatures from $CLAMD_DATABASE.
CLAMD_ENTRYPOINT_SCRIPT = ROOT / "deploy" / "clamd-entrypoint.sh"
CLAMD_ENTRYPOINT = ["/opt/smtpgw/deploy/clamd-entrypoint.sh"]
SHARED_CLAIM = "smtpgw-shared"
# The oldest Kubernetes release the manifests are meant for, and the newest the library knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")

Doc = dict[str, Any]


# ---------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    """The files kubectl would apply: every k8s/*.yaml but the kustomization itself."""
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


def load_documents(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


@pytest.fixture(scope="module")
def documents() -> list[tuple[str, Doc]]:
    """(file name, document) of every manifest."""
    return [(path.name, doc) for path in manifest_files() for doc in load_documents(path)]


@pytest.fixture(scope="module")
def objects(documents: list[tuple[str, Doc]]) -> list[Doc]:
    return [doc for _, doc in documents]


@pytest.fixture(scope="module")
def kustomization() -> Doc:
    docs = load_documents(KUSTOMIZATION)
    assert len(docs) == 1, "kustomization.yaml holds one document"
    return docs[0]


@pytest.fixture(scope="module")
def config() -> Config:
    # env={}: the test's own environment must not change what the file says.
    return load_config(CONFIG_FILE, env={})


def of_kind(objects: list[Doc], kind: str) -> list[Doc]:
    return [o for o in objects if o.get("kind") == kind]


def named(objects: list[Doc], kind: str, name: str) -> Doc | None:
    return next((o for o in of_kind(objects, kind) if o["metadata"]["name"] == name), None)


def workloads(objects: list[Doc]) -> list[Doc]:
    return [o for o in objects if o.get("kind") in WORKLOAD_KINDS]


def template_of(workload: Doc) -> Doc:
    return workload["spec"]["template"]


def pod_spec(workload: Doc) -> Doc:
    return template_of(workload)["spec"]


def pod_labels(workload: Doc) -> dict[str, str]:
    return template_of(workload).get("metadata", {}).get("labels", {})


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(objects: list[Doc], selector: dict[str, str]) -> list[Doc]:
    return [w for w in workloads(objects) if selects(selector, pod_labels(w))]


def label(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def smtpgw_containers(objects: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) of every container running the smtpgw entrypoint (not clamd's)."""
    for workload in workloads(objects):
        for container in containers(workload):
            if container["image"].split(":")[0] == "smtpgw" and "command" not in container:
                yield workload, container


def role_of(container: Doc) -> str:
    args = container.get("args", [])
    return str(args[1]) if len(args) > 1 and args[0] == "run" else ""


def workload_of_role(objects: list[Doc], role: str) -> tuple[Doc, Doc]:
    found = [(w, c) for w, c in smtpgw_containers(objects) if role_of(c) == role]
    assert len(found) == 1, f"expected one container running `smtpgw run {role}`, found {len(found)}"
    return found[0]


def container_ports(container: Doc) -> dict[str | int, int]:
    """Every way a port of the container can be named (its number, its name) -> its number."""
    ports: dict[str | int, int] = {}
    for p in container.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def generated_configmaps(kustomization: Doc) -> dict[str, list[str]]:
    """name -> the keys (file names) of each ConfigMap the kustomization generates."""
    out: dict[str, list[str]] = {}
    for gen in kustomization.get("configMapGenerator", []):
        keys = [str(f).partition("=")[0] if "=" in str(f) else posixpath.basename(str(f)) for f in gen.get("files", [])]
        out[gen["name"]] = keys + [str(lit).partition("=")[0] for lit in gen.get("literals", [])]
    return out


def mount_for(workload: Doc, container: Doc, path: str) -> tuple[Doc, Doc]:
    """(volumeMount, volume) that holds `path` in `container`: the deepest mount above it."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{label(workload)}: nothing is mounted at {path} in container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for template in workload["spec"].get("volumeClaimTemplates", []):
        volumes[template["metadata"]["name"]] = {"name": template["metadata"]["name"], "claimTemplate": template}
    assert mount["name"] in volumes, f"{label(workload)}: the mount at {mount['mountPath']} names no volume"
    return mount, volumes[mount["name"]]


def host_port(address: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(address)
    assert parts.hostname, f"{address!r} names no host"
    return parts.hostname, parts.port or default_port


# ---------------------------------------------------------------- (a) schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(
    documents: list[tuple[str, Doc]], version: str
) -> None:
    assert documents, "k8s/ holds no manifests"
    problems = []
    for name, doc in documents:
        where = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_every_object_is_in_the_smtpgw_namespace(objects: list[Doc], kustomization: Doc) -> None:
    assert named(objects, "Namespace", NAMESPACE) is not None
    assert kustomization.get("namespace") == NAMESPACE
    elsewhere = [label(o) for o in objects if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE]
    assert not elsewhere, f"not in namespace {NAMESPACE}: {elsewhere}"


# ---------------------------------------------------------------- (b) cross-references


def test_the_kustomization_lists_every_manifest_and_only_existing_files(kustomization: Doc) -> None:
    listed = [str(r) for r in kustomization.get("resources", [])]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    missing = [r for r in listed if not (K8S / r).is_file()]
    assert not missing, f"kustomization.yaml lists files that do not exist: {missing}"
    unlisted = sorted({p.name for p in manifest_files()} - set(listed))
    assert not unlisted, f"k8s/ files kustomization.yaml does not list: {unlisted}"
    for gen in kustomization.get("configMapGenerator", []):
        for entry in gen.get("files", []):
            source = str(entry).partition("=")[2] or str(entry)
            # kustomize refuses files outside the kustomization's directory.
            assert (K8S / source).resolve().parent == K8S, f"{source}: outside k8s/"
            assert (K8S / source).is_file(), f"configMapGenerator {gen['name']}: {source} does not exist"


def test_workload_selectors_match_their_own_pod_templates(objects: list[Doc]) -> None:
    for workload in workloads(objects):
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        assert selects(selector, pod_labels(workload)), f"{label(workload)}: selector does not match its template"


def test_every_service_selects_pods_that_expose_its_target_ports(objects: list[Doc]) -> None:
    for service in of_kind(objects, "Service"):
        selector = service["spec"].get("selector", {})
        pods = selected_workloads(objects, selector)
        assert pods, f"{label(service)}: selector {selector} matches no pod template"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in pods:
                exposed = {k for c in containers(workload) for k in container_ports(c)}
                assert target in exposed, f"{label(service)}: no port {target!r} in {label(workload)}"


def test_disruption_budgets_autoscalers_and_statefulsets_name_what_exists(objects: list[Doc]) -> None:
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        protected = selected_workloads(objects, selector)
        assert protected, f"{label(pdb)}: selector matches no pod template"
        for workload in protected:
            # As many pods required as there are would block every node drain.
            required = pdb["spec"].get("minAvailable", 0)
            if isinstance(required, int):
                assert required < workload["spec"].get("replicas", 1), f"{label(pdb)}: no disruption allowed"
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert named(objects, ref["kind"], ref["name"]) is not None, f"{label(hpa)}: no {ref['kind']}/{ref['name']}"
    for sts in of_kind(objects, "StatefulSet"):
        service = named(objects, "Service", sts["spec"]["serviceName"])
        assert service is not None, f"{label(sts)}: serviceName {sts['spec']['serviceName']} is no Service"
        assert selects(service["spec"]["selector"], pod_labels(sts)), f"{label(sts)}: its Service selects other pods"


def test_pods_use_only_configmaps_secrets_and_claims_that_are_defined(objects: list[Doc], kustomization: Doc) -> None:
    configmaps = {o["metadata"]["name"]: list(o.get("data", {})) for o in of_kind(objects, "ConfigMap")}
    configmaps |= generated_configmaps(kustomization)
    secrets = {
        o["metadata"]["name"]: [*o.get("data", {}), *o.get("stringData", {})] for o in of_kind(objects, "Secret")
    }
    claims = {o["metadata"]["name"] for o in of_kind(objects, "PersistentVolumeClaim")}
    problems = []

    def check(where: str, kind: str, name: str, key: str | None = None) -> None:
        known = configmaps if kind == "ConfigMap" else secrets
        if name not in known:
            problems.append(f"{where}: {kind} {name} is not defined")
        elif key is not None and key not in known[name]:
            problems.append(f"{where}: {kind} {name} has no key {key}")

    for workload in workloads(objects):
        where = label(workload)
        spec = pod_spec(workload)
        volume_names = {v["name"] for v in spec.get("volumes", [])}
        volume_names |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                for item in volume["configMap"].get("items", [None]):
                    check(where, "ConfigMap", volume["configMap"]["name"], item and item["key"])
            if "secret" in volume:
                for item in volume["secret"].get("items", [None]):
                    check(where, "Secret", volume["secret"]["secretName"], item and item["key"])
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{where}: PersistentVolumeClaim {claim} is not defined")
        for container in containers(workload):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    check(where, "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
                if "configMapKeyRef" in ref:
                    check(where, "ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    check(where, "Secret", source["secretRef"]["name"])
                if "configMapRef" in source:
                    check(where, "ConfigMap", source["configMapRef"]["name"])
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volume_names:
                    problems.append(f"{where}: container {container['name']} mounts unknown volume {mount['name']}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- (c) the smtpgw containers


def test_every_role_runs_in_one_workload_with_the_mounted_configuration(objects: list[Doc], kustomization: Doc) -> None:
    generated = generated_configmaps(kustomization)
    roles = []
    for workload, container in smtpgw_containers(objects):
        where = f"{label(workload)}/{container['name']}"
        args = [str(a) for a in container.get("args", [])]
        assert args[:1] == ["run"], f"{where}: args {args} do not `run` a service"
        assert role_of(container) in ROLES, f"{where}: args {args} run no role of {ROLES}"
        roles.append(role_of(container))
        options = args[2:]
        assert options[:2] == ["-c", CONFIG_PATH], f"{where}: must read -c {CONFIG_PATH}, runs {args}"
        rest = options[2:]
        threads_ok = len(rest) == 2 and rest[0] == "--threads" and rest[1].isdigit() and int(rest[1]) > 0
        assert not rest or threads_ok, f"{where}: unexpected arguments {rest} (only --threads N)"
        mount, volume = mount_for(workload, container, CONFIG_PATH)
        assert mount["mountPath"] == CONFIG_DIR, f"{where}: the configuration is mounted at {mount['mountPath']}"
        assert "configMap" in volume, f"{where}: {CONFIG_DIR} is not a ConfigMap"
        keys = generated.get(volume["configMap"]["name"], [])
        assert posixpath.basename(CONFIG_PATH) in keys, f"{where}: its ConfigMap has no {CONFIG_PATH}"
    assert sorted(roles) == sorted(ROLES), f"each role once: {sorted(roles)}"


def test_smtpgw_containers_expose_the_ports_the_configuration_listens_on(objects: list[Doc], config: Config) -> None:
    metrics_port = config.metrics.listen.port
    for workload, container in smtpgw_containers(objects):
        where = f"{label(workload)}/{container['name']}"
        ports = container_ports(container)
        expected = {metrics_port} | ({config.receiver.listen.port} if role_of(container) == "receiver" else set())
        assert set(ports.values()) == expected, f"{where}: ports {sorted(set(ports.values()))}, config {expected}"
        # The service's own answers (shared/health.py): live = its event loops run, ready = its
        # broker and clamd answer. Both on the metrics port.
        for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            probe = container.get(kind, {}).get("httpGet", {})
            assert probe.get("path") == path, f"{where}: {kind} must ask {path}"
            assert ports.get(probe.get("port")) == metrics_port, f"{where}: {kind} asks port {probe.get('port')}"
        annotations = template_of(workload)["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", f"{where}: not scraped"
        assert annotations.get("prometheus.io/port") == str(metrics_port), f"{where}: scraped on another port"


def test_the_clamd_containers_listen_where_the_configuration_looks(objects: list[Doc], config: Config) -> None:
    host, port = host_port(config.scanner.clamd, 3310)
    service = named(objects, "Service", host)
    assert service is not None, f"[scanner] clamd: no Service {host}"
    for workload in selected_workloads(objects, service["spec"]["selector"]):
        for container in containers(workload):
            assert port in container_ports(container).values(), f"{label(workload)}: clamd does not listen on {port}"
            assert container["image"].split(":")[0] == "smtpgw", f"{label(workload)}: clamd runs from the smtpgw image"
            assert container.get("command") == CLAMD_ENTRYPOINT, f"{label(workload)}: not clamd's entrypoint"
            # clamd must load the directory the updater fills.
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("CLAMD_DATABASE") == config.updater.database_dir, f"{label(workload)}: CLAMD_DATABASE"
    assert "${CLAMD_DATABASE:-" in CLAMD_ENTRYPOINT_SCRIPT.read_text(encoding="utf-8"), "the entrypoint reads it"


# ---------------------------------------------------------------- (d) the configuration


def test_the_configuration_passes_check_config() -> None:
    # load_config is what `smtpgw check-config` runs; it raises ConfigError naming every problem.
    try:
        config = load_config(CONFIG_FILE, env={})
    except ConfigError as exc:
        pytest.fail("smtpgw check-config refuses k8s/smtpgw.toml:\n" + "\n".join(exc.problems))
    assert config.broker.url.startswith("amqp://"), "the services of separate pods need RabbitMQ"


def test_the_configuration_passes_check_config_with_the_secret_broker_url(objects: list[Doc]) -> None:
    secret = named(objects, "Secret", "smtpgw-broker")
    assert secret is not None
    values = secret.get("stringData", {})
    url = values["SMTPGW_BROKER__URL"]
    loaded = load_config(CONFIG_FILE, env={"SMTPGW_BROKER__URL": url})
    assert loaded.broker.url == url
    # RabbitMQ creates the user of the same Secret: the URL must carry its name and password.
    parts = urlsplit(url)
    assert (parts.username, parts.password) == (values["RABBITMQ_DEFAULT_USER"], values["RABBITMQ_DEFAULT_PASS"])
    # The file's own url (the fallback) names the same broker.
    file_url = urlsplit(tomllib.loads(CONFIG_FILE.read_text(encoding="utf-8"))["broker"]["url"])
    assert (file_url.hostname, file_url.port, file_url.path) == (parts.hostname, parts.port, parts.path)


def resolve(objects: list[Doc], host: str, port: int) -> list[Doc]:
    """The workloads `host:port` reaches in the namespace: a Service, or a StatefulSet pod
    `<statefulset>-<ordinal>.<headless service>`. Fails when it reaches nothing."""
    pod, _, service_name = host.rpartition(".") if "." in host else ("", "", host)
    service = named(objects, "Service", service_name)
    assert service is not None, f"{host}: no Service {service_name}"
    service_ports = {p["port"] for p in service["spec"]["ports"]}
    assert port in service_ports, f"{host}: Service {service_name} has no port {port}"
    if not pod:
        return selected_workloads(objects, service["spec"]["selector"])
    assert service["spec"].get("clusterIP") == "None", f"{host}: pod names need a headless Service"
    sts_name, _, ordinal = pod.rpartition("-")
    sts = named(objects, "StatefulSet", sts_name)
    assert sts is not None, f"{host}: no StatefulSet {sts_name}"
    assert sts["spec"]["serviceName"] == service_name, f"{host}: {sts_name} is governed by another Service"
    assert ordinal.isdigit(), f"{host}: {pod} is not <statefulset>-<ordinal>"
    assert int(ordinal) < sts["spec"].get("replicas", 1), f"{host}: {sts_name} has no pod {pod}"
    return [sts]


def test_every_address_in_the_configuration_is_defined_in_the_manifests(objects: list[Doc], config: Config) -> None:
    addresses = [
        ("scanner.clamd", config.scanner.clamd, 3310),
        *(("updater.clamd", a, 3310) for a in config.updater.clamd),
        ("broker.url", config.broker.url, 5672),
        ("delivery.ledger", config.delivery.ledger, 6379),
    ]
    for key, address, default_port in addresses:
        host, port = host_port(address, default_port)
        reached = resolve(objects, host, port)
        assert reached, f"{key} = {address}: reaches no pod"
        for workload in reached:
            exposed = {p for c in containers(workload) for p in container_ports(c).values()}
            assert port in exposed, f"{key} = {address}: {label(workload)} does not listen on {port}"


def test_the_updater_tells_every_clamd_pod_and_only_those(objects: list[Doc], config: Config) -> None:
    host, _ = host_port(config.scanner.clamd, 3310)
    service = named(objects, "Service", host)
    assert service is not None
    (sts,) = [w for w in selected_workloads(objects, service["spec"]["selector"]) if w["kind"] == "StatefulSet"]
    pods = {f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}" for i in range(sts["spec"]["replicas"])}
    told = {host_port(a, 3310)[0] for a in config.updater.clamd}
    assert told == pods, f"[updater] clamd must list every clamd pod: lists {sorted(told)}, pods {sorted(pods)}"


# ---------------------------------------------------------------- (e) the receiver's Service


def test_the_receiver_service_keeps_the_client_address(objects: list[Doc], config: Config) -> None:
    workload, container = workload_of_role(objects, "receiver")
    services = [s for s in of_kind(objects, "Service") if selects(s["spec"]["selector"], pod_labels(workload))]
    assert len(services) == 1, "one Service in front of the receivers"
    spec = services[0]["spec"]
    assert spec.get("type") == "LoadBalancer"
    # Relay control decides by the client's address: Cluster would replace it by a node's.
    assert spec.get("externalTrafficPolicy") == "Local"
    (port,) = spec["ports"]
    assert port["port"] == 25
    assert container_ports(container).get(port["targetPort"]) == config.receiver.listen.port


# ---------------------------------------------------------------- storage and replicas


def test_the_shared_volume_is_read_write_many_and_only_the_updater_writes_it(objects: list[Doc]) -> None:
    claim = named(objects, "PersistentVolumeClaim", SHARED_CLAIM)
    assert claim is not None
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "clamd and scanner pods on every node read it"
    users = []
    for workload in workloads(objects):
        for volume in pod_spec(workload).get("volumes", []):
            if volume.get("persistentVolumeClaim", {}).get("claimName") != SHARED_CLAIM:
                continue
            for container in containers(workload):
                for mount in container.get("volumeMounts", []):
                    if mount["name"] != volume["name"]:
                        continue
                    users.append(label(workload))
                    writer = role_of(container) == "updater"
                    assert mount.get("readOnly", False) is not writer, f"{label(workload)}: read-only unless updater"
                    # The updater swaps a symlink beside its versions: a subPath would pin one version.
                    assert "subPath" not in mount, f"{label(workload)}: mounts a subPath"
                    assert "subPathExpr" not in mount, f"{label(workload)}: mounts a subPath"
    assert sorted(users) == ["Deployment/scanner", "Deployment/updater", "StatefulSet/clamd"]


def test_each_directory_of_the_configuration_is_on_the_right_volume(objects: list[Doc], config: Config) -> None:
    def claim_at(workload: Doc, container: Doc, path: str, *, parent: bool = False) -> tuple[str, bool]:
        mount, volume = mount_for(workload, container, path)
        if parent:
            # The link and its .versions directory must share the mounted directory.
            assert mount["mountPath"] == posixpath.dirname(path), f"{label(workload)}: {path} not directly in a mount"
        assert "persistentVolumeClaim" in volume, f"{label(workload)}: {path} is not on a PersistentVolumeClaim"
        return volume["persistentVolumeClaim"]["claimName"], bool(mount.get("readOnly", False))

    updater = workload_of_role(objects, "updater")
    assert claim_at(*updater, config.updater.database_dir, parent=True) == (SHARED_CLAIM, False)
    assert claim_at(*updater, config.scanner.rules_dir, parent=True) == (SHARED_CLAIM, False)
    state_claim, read_only = claim_at(*updater, config.updater.state_dir)
    assert state_claim != SHARED_CLAIM, "the updater's state has a volume of its own"
    assert not read_only

    scanner = workload_of_role(objects, "scanner")
    assert claim_at(*scanner, config.scanner.rules_dir, parent=True) == (SHARED_CLAIM, True)

    clamd = named(objects, "StatefulSet", "clamd")
    assert clamd is not None
    assert claim_at(clamd, containers(clamd)[0], config.updater.database_dir, parent=True) == (SHARED_CLAIM, True)

    quarantine = workload_of_role(objects, "quarantine")
    quarantine_claim, read_only = claim_at(*quarantine, config.quarantine.dir)
    assert not read_only
    claim = named(objects, "PersistentVolumeClaim", quarantine_claim)
    assert claim is not None
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], "the quarantine has one writer"


@pytest.mark.parametrize("role", ["quarantine", "updater"])
def test_single_writers_run_once_and_are_replaced_not_rolled(objects: list[Doc], role: str) -> None:
    workload, _ = workload_of_role(objects, role)
    assert workload["kind"] == "Deployment"
    assert workload["spec"]["replicas"] == 1
    assert workload["spec"]["strategy"]["type"] == "Recreate"
    assert not [h for h in of_kind(objects, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == role]


# ---------------------------------------------------------------- hardening


def test_every_container_is_non_root_unprivileged_and_bounded(objects: list[Doc]) -> None:
    problems = []
    for workload in workloads(objects):
        spec = pod_spec(workload)
        pod_security = spec.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{label(workload)}: {key}")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            problems.append(f"{label(workload)}: a hostPath volume")
        for container in containers(workload):
            where = f"{label(workload)}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            if security.get("runAsNonRoot") is not True or security.get("runAsUser", 1) == 0:
                problems.append(f"{where}: may run as root")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if security.get("privileged"):
                problems.append(f"{where}: privileged")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: does not drop every capability")
            if security.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: no seccomp profile")
            if any(p.get("hostPort") for p in container.get("ports", [])):
                problems.append(f"{where}: a hostPort")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(kind, {}):
                        problems.append(f"{where}: no {resource} in resources.{kind}")
            if container["image"].split(":")[0] == "smtpgw":
                # smtpgw writes only under /var/lib/smtpgw and /tmp.
                if security.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{where}: the root file system is writable")
                _, tmp = mount_for(workload, container, "/tmp")
                if "emptyDir" not in tmp:
                    problems.append(f"{where}: /tmp is not an emptyDir")
    assert not problems, "\n".join(problems)
