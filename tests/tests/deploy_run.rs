//! The rendered CPU overlay run on loopback: its worker and gateway commands and
//! environment start real processes, as the kubelet would (probes, mounted secrets,
//! headless names), answer an embedding from each embedding group and stream a chat
//! completion from the generative group.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::deploy_manifests::*;
use rankway_system_tests::{
    FLOAT32, Proc, SERVING, admin_groups, cosine, dns_server, free_port, health, json_f32s, reference,
    smollm2_first_answer, sse_data, worker_bin, workspace_root,
};
use serde_json::{Value, json};

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
        env.push(("RANKWAY_WEIGHTS".into(), FLOAT32.into()));
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
