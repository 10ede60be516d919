//! The Kubernetes manifests in deploy/, rendered with `kubectl kustomize` (from the
//! project's .venv), checked for what schema validation (scripts/check_manifests.py)
//! cannot see: that they agree with each other and with the binaries' flags. They are
//! run in `deploy_run`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use rankway_system_tests::{worker_bin, workspace_root};
use serde::Deserialize;
use serde_json::Value;

/// Every kustomization a user applies.
pub(crate) const DEPLOYMENTS: &[&str] = &["base", "overlays/cpu", "overlays/gpu", "lws"];
/// Where the worker image keeps the models (deploy/docker/worker.Dockerfile,
/// scripts/build_images.sh): the checkout's models/ folder.
pub(crate) const IMAGE_MODELS: &str = "/opt/rankway/models";

pub(crate) fn render(dir: &str) -> Vec<Value> {
    let kubectl = workspace_root().join(".venv/bin/kubectl");
    assert!(
        kubectl.exists(),
        "{} is missing: run scripts/setup.sh",
        kubectl.display()
    );
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(workspace_root().join("deploy").join(dir))
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 manifests");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let yaml = serde_norway::Value::deserialize(doc).expect("YAML");
            serde_json::to_value(yaml).expect("YAML as JSON")
        })
        .collect()
}

pub(crate) fn of_kind<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| d["kind"] == kind)
}

pub(crate) fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().expect("metadata.name")
}

pub(crate) fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().expect("label values are strings").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// True when every key=value of `selector` is among `labels` (and the selector is not empty).
pub(crate) fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A pod a workload would create, with the labels its controller adds.
pub(crate) struct Pod {
    pub(crate) owner: String,
    pub(crate) ordinal: usize,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) spec: Value,
}

/// The labels a workload's controller adds to its pod number `i`.
type ControllerLabels = fn(&Value, usize) -> Vec<(String, String)>;

/// The pods of every StatefulSet, Deployment and LeaderWorkerSet in `docs`.
pub(crate) fn pods(docs: &[Value]) -> Vec<Pod> {
    let mut pods = Vec::new();
    for d in docs {
        let (template, count, extra): (&Value, usize, ControllerLabels) = match d["kind"].as_str() {
            Some("StatefulSet") => (&d["spec"]["template"], replicas(d), |d, i| {
                vec![
                    ("apps.kubernetes.io/pod-index".into(), i.to_string()),
                    (
                        "statefulset.kubernetes.io/pod-name".into(),
                        format!("{}-{i}", name(d)),
                    ),
                ]
            }),
            Some("Deployment") => (&d["spec"]["template"], replicas(d), |_, _| vec![]),
            Some("LeaderWorkerSet") => (
                &d["spec"]["leaderWorkerTemplate"]["workerTemplate"],
                lws_size(d),
                |d, i| {
                    vec![
                        ("leaderworkerset.sigs.k8s.io/name".into(), name(d).to_owned()),
                        ("leaderworkerset.sigs.k8s.io/worker-index".into(), i.to_string()),
                        ("leaderworkerset.sigs.k8s.io/group-index".into(), "0".into()),
                    ]
                },
            ),
            _ => continue,
        };
        for i in 0..count {
            let mut l = labels(&template["metadata"]["labels"]);
            l.extend(extra(d, i));
            pods.push(Pod {
                owner: name(d).to_owned(),
                ordinal: i,
                labels: l,
                spec: template["spec"].clone(),
            });
        }
    }
    pods
}

pub(crate) fn replicas(d: &Value) -> usize {
    d["spec"]["replicas"].as_u64().unwrap_or(1) as usize
}

pub(crate) fn lws_size(d: &Value) -> usize {
    d["spec"]["leaderWorkerTemplate"]["size"]
        .as_u64()
        .expect("LWS size") as usize
}

pub(crate) fn container<'a>(spec: &'a Value, image_prefix: &str) -> Option<&'a Value> {
    spec["containers"]
        .as_array()?
        .iter()
        .find(|c| c["image"].as_str().is_some_and(|i| i.starts_with(image_prefix)))
}

pub(crate) fn env_value<'a>(c: &'a Value, var: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == var)?["value"].as_str()
}

/// What a binary says it accepts, read from its `--help`.
pub(crate) struct Help {
    text: String,
}

impl Help {
    fn of(bin: &std::path::Path, args: &[&str]) -> Self {
        let out = Command::new(bin)
            .args(args)
            .arg("--help")
            .output()
            .expect("run --help");
        assert!(out.status.success(), "{} {args:?} --help failed", bin.display());
        let text = String::from_utf8(out.stdout).unwrap();
        Self {
            text: text.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.text.contains(&format!("{flag} ")) || self.text.contains(&format!("{flag}="))
    }

    fn env_vars(&self) -> BTreeSet<String> {
        self.text
            .split("[env: ")
            .skip(1)
            .map(|s| s.split(['=', ']']).next().unwrap().to_owned())
            .collect()
    }

    /// Prefixes of variables passed through to libraries, written as `NCCL_*`.
    fn env_prefixes(&self) -> Vec<String> {
        self.text
            .split_whitespace()
            .filter_map(|w| w.strip_suffix("_*").map(|p| format!("{p}_")))
            .collect()
    }

    fn accepts_env(&self, var: &str) -> bool {
        self.env_vars().contains(var) || self.env_prefixes().iter().any(|p| var.starts_with(p))
    }

    /// The port of a flag's `[default: HOST:PORT]` or `[default: PORT]`.
    fn default_port(&self, flag: &str) -> u16 {
        let at = self
            .text
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} in --help"));
        let rest = &self.text[at..];
        let default = rest
            .split("[default: ")
            .nth(1)
            .expect("a default")
            .split(']')
            .next()
            .unwrap();
        default.rsplit(':').next().unwrap().parse().expect("a port")
    }
}

pub(crate) fn gateway_bin() -> std::path::PathBuf {
    rankway_system_tests::gateway_bin()
}

pub(crate) fn port_of(c: &Value, port_name: &str) -> u16 {
    c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == port_name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container port {port_name:?} in {c}")) as u16
}

/// Flags, variables, ports and probes of a container against its binary's `--help`.
pub(crate) fn check_container(what: &str, c: &Value, help: &Help, ports: &[(&str, u16)]) {
    for arg in c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(c["command"].as_array().into_iter().flatten())
    {
        let arg = arg.as_str().unwrap();
        if let Some(flag) = arg.strip_prefix("--") {
            let flag = format!("--{}", flag.split('=').next().unwrap());
            assert!(help.has_flag(&flag), "{what}: {flag} is not a flag of the binary");
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let var = e["name"].as_str().unwrap();
        assert!(
            help.accepts_env(var),
            "{what}: the binary reads no variable {var}"
        );
    }
    for (port_name, want) in ports {
        assert_eq!(
            port_of(c, port_name),
            *want,
            "{what}: port {port_name} is not the binary's default"
        );
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        let p = &c[probe];
        assert!(p.is_object(), "{what}: no {probe}");
        let port = p["grpc"]["port"]
            .as_u64()
            .or(p["httpGet"]["port"].as_u64())
            .expect("probe port");
        assert!(
            ports.iter().any(|(_, want)| u64::from(*want) == port),
            "{what}: {probe} port {port} is not one the binary listens on by default"
        );
    }
}

#[test]
fn manifests_agree_with_each_other_and_with_the_binaries() {
    let worker_help = Help::of(&worker_bin(), &["serve"]);
    let worker_cmds = Help::of(&worker_bin(), &[]);
    let gateway_help = Help::of(&gateway_bin(), &[]);
    let grpc_port = worker_help.default_port("--listen");
    let metrics_port = worker_help.default_port("--metrics-listen");
    let http_port = gateway_help.default_port("--http-listen");
    let gw_grpc_port = gateway_help.default_port("--grpc-listen");
    let store_port = worker_help.default_port("--master-port");

    for dir in DEPLOYMENTS {
        let docs = render(dir);
        let pods = pods(&docs);
        let services: BTreeMap<&str, &Value> = of_kind(&docs, "Service").map(|s| (name(s), s)).collect();
        assert!(!pods.is_empty(), "{dir}: no pods");

        for sts in of_kind(&docs, "StatefulSet") {
            let what = format!("{dir}: StatefulSet {}", name(sts));
            let template_labels = labels(&sts["spec"]["template"]["metadata"]["labels"]);
            assert!(
                selects(&labels(&sts["spec"]["selector"]["matchLabels"]), &template_labels),
                "{what}: selector does not match its template's labels"
            );
            assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel", "{what}");
            let svc_name = sts["spec"]["serviceName"].as_str().expect("serviceName");
            let svc = services
                .get(svc_name)
                .unwrap_or_else(|| panic!("{what}: no Service {svc_name}"));
            assert_eq!(
                svc["spec"]["clusterIP"], "None",
                "{what}: Service {svc_name} is not headless"
            );
            assert_eq!(
                svc["spec"]["publishNotReadyAddresses"], true,
                "{what}: ranks must resolve each other before they are ready"
            );
            assert!(
                selects(&labels(&svc["spec"]["selector"]), &template_labels),
                "{what}: Service {svc_name} does not select its pods"
            );
            let c = container(&sts["spec"]["template"]["spec"], "rankway-worker").expect("worker container");
            assert_eq!(
                env_value(c, "MASTER_ADDR"),
                Some(format!("{}-0.{svc_name}", name(sts)).as_str()),
                "{what}: MASTER_ADDR"
            );
            assert_eq!(
                env_value(c, "WORLD_SIZE"),
                Some(replicas(sts).to_string().as_str()),
                "{what}: WORLD_SIZE must equal replicas"
            );
            assert_eq!(
                env_value(c, "MASTER_PORT"),
                Some(store_port.to_string().as_str()),
                "{what}"
            );
        }

        for lws in of_kind(&docs, "LeaderWorkerSet") {
            let what = format!("{dir}: LeaderWorkerSet {}", name(lws));
            let t = &lws["spec"]["leaderWorkerTemplate"];
            assert_eq!(t["restartPolicy"], "RecreateGroupOnPodRestart", "{what}");
            // Rank 0 is ready only when every rank joined: LeaderReady would never start them.
            assert_eq!(lws["spec"]["startupPolicy"], "LeaderCreated", "{what}");
            let c = container(&t["workerTemplate"]["spec"], "rankway-worker").expect("worker container");
            for var in ["RANK", "WORLD_SIZE", "MASTER_ADDR"] {
                assert_eq!(
                    env_value(c, var),
                    None,
                    "{what}: {var} would override the LWS_* variables"
                );
            }
            for var in ["LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"] {
                assert!(worker_help.accepts_env(var), "the worker does not read {var}");
            }
        }

        for d in of_kind(&docs, "Deployment") {
            assert!(
                selects(
                    &labels(&d["spec"]["selector"]["matchLabels"]),
                    &labels(&d["spec"]["template"]["metadata"]["labels"])
                ),
                "{dir}: Deployment {} selector does not match its template",
                name(d)
            );
        }
        let selects_some = |sel: &BTreeMap<String, String>| pods.iter().any(|p| selects(sel, &p.labels));
        for svc in services.values() {
            let sel = labels(&svc["spec"]["selector"]);
            assert!(selects_some(&sel), "{dir}: Service {} selects no pod", name(svc));
        }
        for np in of_kind(&docs, "NetworkPolicy") {
            let sel = labels(&np["spec"]["podSelector"]["matchLabels"]);
            assert!(
                selects_some(&sel),
                "{dir}: NetworkPolicy {} selects no pod",
                name(np)
            );
            for rule in np["spec"]["ingress"].as_array().into_iter().flatten() {
                for from in rule["from"].as_array().into_iter().flatten() {
                    let sel = labels(&from["podSelector"]["matchLabels"]);
                    assert!(
                        selects_some(&sel),
                        "{dir}: NetworkPolicy {} admits no pod",
                        name(np)
                    );
                }
            }
        }
        let leaders = services
            .get("rankway-leaders")
            .expect("a rankway-leaders Service");
        let leader_sel = labels(&leaders["spec"]["selector"]);
        let chosen: BTreeSet<(&str, usize)> = pods
            .iter()
            .filter(|p| selects(&leader_sel, &p.labels))
            .map(|p| (p.owner.as_str(), p.ordinal))
            .collect();
        let rank0s: BTreeSet<(&str, usize)> = pods
            .iter()
            .filter(|p| p.ordinal == 0 && container(&p.spec, "rankway-worker").is_some())
            .map(|p| (p.owner.as_str(), p.ordinal))
            .collect();
        assert_eq!(
            chosen, rank0s,
            "{dir}: the leaders Service must select exactly each group's rank 0"
        );
        for hpa in of_kind(&docs, "HorizontalPodAutoscaler") {
            let target = hpa["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
            assert!(
                of_kind(&docs, "Deployment").any(|d| name(d) == target),
                "{dir}: HPA target {target}"
            );
        }
        for pdb in of_kind(&docs, "PodDisruptionBudget") {
            let sel = labels(&pdb["spec"]["selector"]["matchLabels"]);
            assert!(selects_some(&sel), "{dir}: PDB {} selects no pod", name(pdb));
        }

        for p in &pods {
            let what = format!("{dir}: {} pod {}", p.owner, p.ordinal);
            if let Some(c) = container(&p.spec, "rankway-worker") {
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                let sub = args.first().copied().expect("a subcommand");
                assert!(
                    worker_cmds.text.contains(&format!(" {sub} ")),
                    "{what}: no subcommand {sub}"
                );
                // Model paths point into the image's models folder, which is the
                // checkout's models/ (scripts/build_images.sh stages it).
                for var in ["RANKWAY_MODEL_DIR", "RANKWAY_GGUF"] {
                    if let Some(path) = env_value(c, var) {
                        let local = path
                            .strip_prefix(IMAGE_MODELS)
                            .map(|rest| workspace_root().join("models").join(rest.trim_start_matches('/')))
                            .unwrap_or_else(|| panic!("{what}: {var}={path} is outside {IMAGE_MODELS}"));
                        assert!(local.exists(), "{what}: {var}={path}: the image has no such file");
                    }
                }
                check_container(
                    &what,
                    c,
                    &worker_help,
                    &[
                        ("grpc", grpc_port),
                        ("c10d-store", store_port),
                        ("metrics", metrics_port),
                    ],
                );
            }
            if let Some(c) = container(&p.spec, "rankway-gateway") {
                check_container(
                    &what,
                    c,
                    &gateway_help,
                    &[("http", http_port), ("grpc", gw_grpc_port)],
                );
                // /metrics and /admin/* on a port of their own, which no Service exposes.
                let admin = port_of(c, "admin");
                let listen = env_value(c, "RANKWAY_ADMIN_LISTEN");
                assert_eq!(
                    listen.and_then(|a| a.rsplit(':').next()),
                    Some(admin.to_string().as_str()),
                    "{what}: RANKWAY_ADMIN_LISTEN"
                );
                for svc in services
                    .values()
                    .filter(|s| selects(&labels(&s["spec"]["selector"]), &p.labels))
                {
                    for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
                        assert!(
                            port["targetPort"] != "admin" && port["targetPort"] != u64::from(admin),
                            "{what}: Service {} exposes the admin port",
                            name(svc)
                        );
                    }
                }
            }
            let sc = &p.spec["containers"][0]["securityContext"];
            assert_eq!(p.spec["securityContext"]["runAsNonRoot"], true, "{what}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert!(
                p.spec["containers"][0]["resources"]["requests"].is_object(),
                "{what}: no requests"
            );
            assert!(
                p.spec["containers"][0]["resources"]["limits"].is_object(),
                "{what}: no limits"
            );
        }
    }
}
