//! The Kubernetes manifests in deploy/, rendered with `kubectl kustomize` (from the
//! project's .venv), checked for what schema validation (scripts/check_manifests.py)
//! cannot see, and then run: the rendered CPU overlay's worker and gateway commands and
//! environment start real processes on loopback, answer an embedding from each
//! embedding group and stream a chat completion from the generative group.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{
    FLOAT32, Proc, SERVING, admin_groups, cosine, dns_server, free_port, health, json_f32s, reference,
    smollm2_first_answer, sse_data, worker_bin, workspace_root,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// Every kustomization a user applies.
const DEPLOYMENTS: &[&str] = &["base", "overlays/cpu", "overlays/gpu", "lws"];
/// Where the worker image keeps the models (deploy/docker/worker.Dockerfile,
/// scripts/build_images.sh): the checkout's models/ folder.
const IMAGE_MODELS: &str = "/opt/rankway/models";

fn render(dir: &str) -> Vec<Value> {
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

fn of_kind<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| d["kind"] == kind)
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().expect("metadata.name")
}

fn labels(v: &Value) -> BTreeMap<String, String> {
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
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A pod a workload would create, with the labels its controller adds.
struct Pod {
    owner: String,
    ordinal: usize,
    labels: BTreeMap<String, String>,
    spec: Value,
}

/// The labels a workload's controller adds to its pod number `i`.
type ControllerLabels = fn(&Value, usize) -> Vec<(String, String)>;

/// The pods of every StatefulSet, Deployment and LeaderWorkerSet in `docs`.
fn pods(docs: &[Value]) -> Vec<Pod> {
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

fn replicas(d: &Value) -> usize {
    d["spec"]["replicas"].as_u64().unwrap_or(1) as usize
}

fn lws_size(d: &Value) -> usize {
    d["spec"]["leaderWorkerTemplate"]["size"]
        .as_u64()
        .expect("LWS size") as usize
}

fn container<'a>(spec: &'a Value, image_prefix: &str) -> Option<&'a Value> {
    spec["containers"]
        .as_array()?
        .iter()
        .find(|c| c["image"].as_str().is_some_and(|i| i.starts_with(image_prefix)))
}

fn env_value<'a>(c: &'a Value, var: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == var)?["value"].as_str()
}

/// What a binary says it accepts, read from its `--help`.
struct Help {
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

fn gateway_bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_rankway-gateway").into()
}

fn port_of(c: &Value, port_name: &str) -> u16 {
    c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == port_name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container port {port_name:?} in {c}")) as u16
}

/// Flags, variables, ports and probes of a container against its binary's `--help`.
fn check_container(what: &str, c: &Value, help: &Help, ports: &[(&str, u16)]) {
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

/// A pod of the rendered manifests, on its own loopback address.
struct Host {
    ip: Ipv4Addr,
    dns: Vec<String>,
}

/// Runs container `c`'s `probe` against its pod at `ip` as the kubelet does: an
/// `httpGet` passes on a 2xx or 3xx answer, a `grpc` one on SERVING.
async fn kubelet_probe(c: &Value, probe: &str, ip: Ipv4Addr) -> bool {
    let p = &c[probe];
    if let Some(port) = p["httpGet"]["port"].as_u64() {
        let path = p["httpGet"]["path"].as_str().unwrap_or("/");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        return client
            .get(format!("http://{ip}:{port}{path}"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success() || r.status().is_redirection());
    }
    let port = p["grpc"]["port"].as_u64().expect("an httpGet or grpc probe");
    let service = p["grpc"]["service"].as_str().unwrap_or("");
    health(&format!("{ip}:{port}"), service).await == Some(SERVING)
}

/// The container's environment as the kubelet would give it: values, downward-API fields
/// resolved for `pod` on `ip`, pod DNS names replaced by their loopback addresses.
fn kubelet_env(c: &Value, pod: &Pod, ip: Ipv4Addr, hosts: &[Host]) -> Vec<(String, String)> {
    let resolve = |v: &str| {
        let mut v = v.to_owned();
        for h in hosts {
            for name in &h.dns {
                if v == *name || v.starts_with(&format!("{name}:")) {
                    v = v.replacen(name.as_str(), &h.ip.to_string(), 1);
                }
            }
        }
        v
    };
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let var = e["name"].as_str().unwrap().to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                resolve(v)
            } else {
                let field = e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .expect("fieldRef");
                match field {
                    "status.podIP" => ip.to_string(),
                    _ => {
                        let label = field
                            .strip_prefix("metadata.labels['")
                            .and_then(|l| l.strip_suffix("']"))
                            .unwrap_or_else(|| panic!("downward API field {field}"));
                        pod.labels
                            .get(label)
                            .unwrap_or_else(|| panic!("pod label {label}"))
                            .clone()
                    }
                }
            };
            (var, value)
        })
        .collect()
}

/// The Secret volumes of container `c` of pod `spec`, as the kubelet would mount them:
/// (mount path, a folder under `root` holding each of the Secret's keys as a file).
fn mount_secrets(
    docs: &[Value],
    spec: &Value,
    c: &Value,
    root: &std::path::Path,
) -> Vec<(String, std::path::PathBuf)> {
    use base64::Engine;
    c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let volume = spec["volumes"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == m["name"])?;
            let secret_name = volume["secret"]["secretName"].as_str()?;
            let secret = of_kind(docs, "Secret")
                .find(|s| name(s) == secret_name)
                .unwrap_or_else(|| {
                    panic!(
                        "volume {} mounts Secret {secret_name}, which the render lacks",
                        m["name"]
                    )
                });
            let dir = root.join(secret_name);
            std::fs::create_dir_all(&dir).unwrap();
            for (key, value) in secret["data"].as_object().unwrap() {
                let text: String = value.as_str().unwrap().split_whitespace().collect();
                let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
                std::fs::write(dir.join(key), bytes).unwrap();
            }
            Some((m["mountPath"].as_str().unwrap().to_owned(), dir))
        })
        .collect()
}

/// `env` with every path under a mounted Secret pointed at its local copy.
fn with_mounts(env: &mut [(String, String)], mounts: &[(String, std::path::PathBuf)]) {
    for (_, value) in env.iter_mut() {
        for (path, dir) in mounts {
            if let Some(rest) = value.strip_prefix(path.as_str()) {
                *value = format!("{}{rest}", dir.display());
            }
        }
    }
}

/// The rendered CPU overlay, run. Substitutions, and only these: each pod gets its own
/// loopback address (127.0.0.10 and up) for the pod IP, its DNS names and its 0.0.0.0
/// listen addresses (gRPC, metrics); the TCPStore port is a free one per group (the store
/// listens on every address, so groups on one host cannot share it); the image's models
/// folder is the checkout's; the cluster's DNS is a loopback server answering the leaders
/// name with the pods the rankway-leaders Service selects; a Secret volume is a folder
/// holding the rendered Secret's keys; workers use one torch thread and float32 matrices
/// (the greedy answer compared is the float32 reference's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_cpu_overlay_serves_embeddings_and_streams_a_chat_completion() {
    let docs = render("overlays/cpu");
    let pods = pods(&docs);
    let services: Vec<&Value> = of_kind(&docs, "Service").collect();
    let hosts: Vec<Host> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let pod_name = format!("{}-{}", p.owner, p.ordinal);
            let dns = services
                .iter()
                .filter(|s| {
                    s["spec"]["clusterIP"] == "None" && selects(&labels(&s["spec"]["selector"]), &p.labels)
                })
                .map(|s| format!("{pod_name}.{}", name(s)))
                .collect();
            Host {
                ip: Ipv4Addr::new(127, 0, 0, 10 + i as u8),
                dns,
            }
        })
        .collect();
    let store_ports: BTreeMap<&str, u16> = pods.iter().map(|p| (p.owner.as_str(), free_port())).collect();
    let secrets = std::env::temp_dir().join(format!("rankway-deploy-secrets-{}", std::process::id()));

    let mut workers = Vec::new();
    let mut rank_addrs = Vec::new();
    let mut rank_probes = Vec::new();
    for (p, h) in pods.iter().zip(&hosts) {
        let Some(c) = container(&p.spec, "rankway-worker") else {
            continue;
        };
        let mut env = kubelet_env(c, p, h.ip, &hosts);
        with_mounts(&mut env, &mount_secrets(&docs, &p.spec, c, &secrets));
        for (var, value) in env.iter_mut() {
            match var.as_str() {
                "MASTER_PORT" => *value = store_ports[p.owner.as_str()].to_string(),
                "RANKWAY_MODEL_DIR" | "RANKWAY_GGUF" => {
                    let models = workspace_root().join("models");
                    *value = value.replace(IMAGE_MODELS, &models.display().to_string())
                }
                _ => {}
            }
        }
        let port = port_of(c, "grpc");
        env.push(("RANKWAY_LISTEN".into(), format!("{}:{port}", h.ip)));
        env.push((
            "RANKWAY_METRICS_LISTEN".into(),
            format!("{}:{}", h.ip, port_of(c, "metrics")),
        ));
        env.push(("RANKWAY_TORCH_THREADS".into(), "1".into()));
        env.push(("RANKWAY_DTYPE".into(), FLOAT32.into()));
        let mut cmd = Command::new(worker_bin());
        cmd.env_clear()
            .args(c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()))
            .envs(env);
        workers.push(Proc::spawn(cmd));
        rank_addrs.push(format!("{}:{port}", h.ip));
        rank_probes.push((h.ip, c.clone()));
    }
    assert_eq!(
        workers.len(),
        7,
        "the CPU overlay runs 2 embedding groups of 2 ranks and a generative group of 3"
    );

    let leaders = services.iter().find(|s| name(s) == "rankway-leaders").unwrap();
    let leader_ips: Vec<Ipv4Addr> = pods
        .iter()
        .zip(&hosts)
        .filter(|(p, _)| selects(&labels(&leaders["spec"]["selector"]), &p.labels))
        .map(|(_, h)| h.ip)
        .collect();
    assert_eq!(leader_ips.len(), 3);
    let dns = dns_server(Arc::new(Mutex::new(leader_ips))).await;

    let (gp, gh) = pods
        .iter()
        .zip(&hosts)
        .find(|(p, _)| container(&p.spec, "rankway-gateway").is_some())
        .expect("a gateway pod");
    let c = container(&gp.spec, "rankway-gateway").unwrap();
    let mut env = kubelet_env(c, gp, gh.ip, &hosts);
    with_mounts(&mut env, &mount_secrets(&docs, &gp.spec, c, &secrets));
    let http = format!("{}:{}", gh.ip, port_of(c, "http"));
    env.push(("RANKWAY_HTTP_LISTEN".into(), http.clone()));
    env.push((
        "RANKWAY_GRPC_LISTEN".into(),
        format!("{}:{}", gh.ip, port_of(c, "grpc")),
    ));
    let admin = format!("{}:{}", gh.ip, port_of(c, "admin"));
    env.push(("RANKWAY_ADMIN_LISTEN".into(), admin.clone()));
    env.push(("RANKWAY_DNS_SERVER".into(), dns.to_string()));
    env.push(("RANKWAY_DNS_INTERVAL".into(), "200ms".into()));
    let mut cmd = Command::new(gateway_bin());
    cmd.env_clear().envs(env);
    let mut gateway = Proc::spawn(cmd);
    gateway.wait_for_log("gateway listening");

    // The manifests' probes as the kubelet would run them: every rank live, then ready.
    let deadline = Instant::now() + Duration::from_secs(90);
    for probe in ["livenessProbe", "readinessProbe"] {
        for (ip, c) in &rank_probes {
            while !kubelet_probe(c, probe, *ip).await {
                assert!(Instant::now() < deadline, "rank at {ip}: {probe} never passes");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let client = reqwest::Client::new();
    loop {
        let groups = admin_groups(&client, &format!("http://{admin}")).await;
        let ready = groups.iter().filter(|g| g["ready"] == true).count();
        if ready == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "groups not all ready: {groups:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let r = reference();
    for (i, sentence) in r.sentences.iter().take(4).enumerate() {
        let resp = client
            .post(format!("http://{http}/v1/embeddings"))
            .json(&json!({"model": "minilm", "input": sentence}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        let got = json_f32s(&body["data"][0]["embedding"]);
        let cos = cosine(&got, &r.embeddings[i]);
        assert!(cos >= 0.9999, "sentence {i}: cosine {cos} to the reference");
    }
    // The generative group, streamed: the greedy answer the worker gives on its own.
    let (question, answer) = smollm2_first_answer();
    let resp = client
        .post(format!("http://{http}/v1/chat/completions"))
        .json(&json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 32,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_data(&resp.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(chunks.len() >= 4, "streamed in pieces: {chunks:?}");
    assert_eq!(text, answer);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // The gateway reached every group with the Secret's token; nobody else is answered.
    let mut rank0 =
        rankway_proto::worker::worker_client::WorkerClient::connect(format!("http://{}", rank_addrs[0]))
            .await
            .unwrap();
    let err = rank0
        .group_status(rankway_proto::worker::GroupStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    assert!(gateway.is_running());
    for w in &mut workers {
        assert!(w.is_running(), "a rank exited:\n{}", w.log_text());
    }
    std::fs::remove_dir_all(&secrets).unwrap();
}
