//! Harness for integration tests: starts the real `rankway-worker` and `rankway-gateway`
//! binaries on loopback (port 0, addresses read back from their JSON logs) and stops
//! them when dropped.

pub mod fake_worker;
pub mod otlp;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use rankway_proto::inference::ModelInferRequest;
use rankway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_proto::worker::worker_client::WorkerClient;
use serde_json::Value;
use tonic::transport::Channel;

const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The worker binary: `RANKWAY_WORKER_BIN`, else the release build in `target/`.
pub fn worker_bin() -> PathBuf {
    let path = std::env::var_os("RANKWAY_WORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/rankway-worker"));
    assert!(
        path.exists(),
        "{} is missing: run `make test` (or `cargo build --release -p rankway-worker`) first",
        path.display()
    );
    path
}

pub fn model_dir() -> PathBuf {
    let dir = workspace_root().join("models/minilm");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/setup.sh",
        dir.display()
    );
    dir
}

/// A child process that is killed when dropped, with its log lines on a channel.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Self {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env("RANKWAY_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn process");
        let stderr: ChildStderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Self { child, lines, log }
    }

    /// Waits for the JSON log line whose message is `message`; returns its fields.
    pub fn wait_for_log(&mut self, message: &str) -> serde_json::Map<String, Value> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!(
                    "no {message:?} log line within {START_TIMEOUT:?}; exit: {:?}; log:\n{}",
                    self.child.try_wait(),
                    self.log.lock().unwrap().join("\n")
                ),
            };
            let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(Value::Object(fields)) = obj.get("fields")
                && fields.get("message").and_then(Value::as_str) == Some(message)
            {
                return fields.clone();
            }
        }
    }

    pub fn addr_field(fields: &serde_json::Map<String, Value>, key: &str) -> SocketAddr {
        fields
            .get(key)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("log field {key} is not an address: {fields:?}"))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The log once `done` holds for it. Another thread reads the lines, so one the
    /// process has already written may not be here yet; panics after 10 s, naming `what`.
    pub async fn log_when(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log_text();
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} in the log within 10 s:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    /// SIGTERM first, so a launcher stops its ranks and a worker drains; SIGKILL if the
    /// process is still there after a few seconds. When a test is failing, the end of
    /// the process's log goes to the test output first.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A panic may have poisoned the lock (a failed wait_for_log holds it while it
            // formats its message); panicking again here would abort every other test.
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let tail = &log[log.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} log lines of pid {} ---\n{}",
                tail.len(),
                self.child.id(),
                tail.join("\n")
            );
        }
        if self.is_running() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `rankway-worker serve` process (a group of one rank).
/// SmolLM2 ranks in these tests hold float32 matrices: the reference's numerics, which
/// the answers are compared with. (`auto` picks bfloat16 on a CPU with AVX512-BF16; the
/// worker's unit tests hold that to the reference within its tolerance, and the image
/// smoke run in scripts/build_images.sh serves a chat completion with it.)
pub const FLOAT32: &str = "float32";

pub struct Worker {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
}

impl Worker {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_rank(&[], extra)
    }

    /// A rank of a group: `env` carries the rendezvous contract (RANK, WORLD_SIZE, ...).
    pub fn start_rank(env: &[(&str, String)], extra: &[&str]) -> Self {
        let mut cmd = Command::new(worker_bin());
        cmd.arg("serve")
            .env("RANKWAY_LISTEN", "127.0.0.1:0") // a --listen flag in `extra` wins
            .env("RANKWAY_METRICS_LISTEN", "127.0.0.1:0")
            .arg(format!("--model-dir={}", model_dir().display()))
            .arg("--torch-threads=1")
            .env("RANKWAY_DTYPE", FLOAT32)
            .env("RANKWAY_DIST_HOST", "127.0.0.1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(extra);
        let mut proc = Proc::spawn(cmd);
        let fields = proc.wait_for_log("worker listening");
        let addr = Proc::addr_field(&fields, "addr");
        let metrics = Proc::addr_field(&fields, "metrics_addr");
        Self { proc, addr, metrics }
    }

    pub async fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to worker")
    }

    /// Starts every rank of a group of `world` ranks; element 0 is rank 0.
    pub fn start_group(world: usize, extra: &[&str]) -> Vec<Worker> {
        let master_port = free_port().to_string();
        (0..world)
            .map(|rank| {
                let env = [
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", world.to_string()),
                    ("MASTER_ADDR", "127.0.0.1".to_owned()),
                    ("MASTER_PORT", master_port.clone()),
                ];
                Worker::start_rank(&env, extra)
            })
            .collect()
    }

    /// grpc.health.v1 status of this rank ("" service), or None if it does not answer.
    pub async fn health(&self) -> Option<i32> {
        health(&self.addr.to_string(), "").await
    }

    /// Sum of the samples of `name` whose labels contain `label` (empty for all), from
    /// this rank's `GET /metrics`, as [`Gateway::metric_sum`] reads the gateway's.
    pub async fn metric_sum(&self, name: &str, label: &str) -> f64 {
        sample_sum(
            &get_text(format!("http://{}/metrics", self.metrics)).await,
            name,
            label,
        )
    }

    /// Status and body of `GET /health/{what}` (`live`, `ready`) on the metrics port.
    pub async fn probe(&self, what: &str) -> (u16, String) {
        let resp = reqwest::get(format!("http://{}/health/{what}", self.metrics))
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    pub async fn wait_serving(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.health().await != Some(SERVING) {
            assert!(
                Instant::now() < deadline,
                "rank at {} not SERVING within {within:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Batches the worker has run so far.
    pub async fn batches_completed(&self) -> u64 {
        let status = self
            .client()
            .await
            .group_status(rankway_proto::worker::GroupStatusRequest {})
            .await;
        status.expect("group status").into_inner().batches_completed
    }
}

/// The grpc.health.v1 status of `service` at `addr` (None if it cannot be asked).
pub async fn health(addr: &str, service: &str) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    client.check(req).await.ok().map(|r| r.into_inner().status)
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// A port that was free a moment ago (for the c10d store, which the worker binds itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first of `n` consecutive ports that were free a moment ago, for `launch`'s
/// `--port` and `--master-port` (group g uses base + g). Below Linux's ephemeral range
/// (32768-60999), so no client socket can be holding base + 1 the way it can hold the
/// neighbour of a port from `free_port`.
pub fn free_port_run(n: u16) -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..100 {
        let base = rng.random_range(20000..32000 - n);
        if (base..base + n).all(|p| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports in 20000-32000");
}

/// One `rankway-gateway` process in front of the given workers.
pub struct Gateway {
    pub proc: Proc,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl Gateway {
    pub fn start(workers: &[&Worker], extra: &[&str]) -> Self {
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
        Self::start_addrs(&addrs, extra)
    }

    /// A gateway in front of groups whose rank 0 listens at `addrs`.
    pub fn start_addrs(addrs: &[String], extra: &[&str]) -> Self {
        Self::start_with_env(addrs, &[], extra)
    }

    /// Like [`Gateway::start_addrs`], with environment variables (e.g. `RUST_LOG`).
    pub fn start_with_env(addrs: &[String], env: &[(&str, &str)], extra: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rankway-gateway"));
        cmd.envs(env.iter().copied())
            .arg("--http-listen=127.0.0.1:0")
            .arg("--grpc-listen=127.0.0.1:0")
            .arg("--health-interval=200ms")
            .args(extra);
        for (i, a) in addrs.iter().enumerate() {
            cmd.arg(format!("--group=g{i}={a}"));
        }
        let mut proc = Proc::spawn(cmd);
        let fields = proc.wait_for_log("gateway listening");
        let http = Proc::addr_field(&fields, "http_addr");
        let grpc = Proc::addr_field(&fields, "grpc_addr");
        Self { proc, http, grpc }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub async fn grpc_client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to gateway")
    }

    /// Sum of the samples of counter `name` (e.g. `rankway_batches_total`) whose labels
    /// contain `label` (e.g. `group="g1"`; empty for all), from `GET /metrics`.
    pub async fn metric_sum(&self, name: &str, label: &str) -> f64 {
        sample_sum(&get_text(self.url("/metrics")).await, name, label)
    }

    /// Waits until the gateway routes to a ready group serving `model`.
    pub async fn wait_model_ready(&self, model: &str) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.url(&format!("/v2/models/{model}/ready"));
        while !http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
            assert!(
                Instant::now() < deadline,
                "model {model} not ready within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the gateway reports ready (its groups passed a health check).
    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ok = http
                .get(self.url("/v2/health/ready"))
                .send()
                .await
                .map(|r| r.status().is_success());
            if ok.unwrap_or(false) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready within {START_TIMEOUT:?}:\n{}",
                self.proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `rankway-worker launch`: groups of ranks on loopback under the launcher.
pub struct Launcher {
    pub proc: Proc,
    pub leaders: Vec<String>,
}

impl Launcher {
    pub fn start(groups: usize, ranks: usize, serve_args: &[&str]) -> Self {
        let n = u16::try_from(groups).expect("groups fit a port range");
        let port = free_port_run(n);
        let master_port = loop {
            let m = free_port_run(n);
            if m + n <= port || m >= port + n {
                break m;
            }
        };
        let mut cmd = Command::new(worker_bin());
        cmd.arg("launch")
            .arg(format!("--groups={groups}"))
            .arg(format!("--ranks-per-group={ranks}"))
            .arg(format!("--port={port}"))
            .arg("--follower-port=0")
            .arg(format!("--master-port={master_port}"))
            // Any free port for what the tests need not reach: port ranges picked from one
            // free port can clash with other sockets' ephemeral ports.
            .arg("--metrics-port=0")
            .arg("--backoff=200ms")
            .env("RANKWAY_DTYPE", FLOAT32)
            .arg("--")
            .arg(format!("--model-dir={}", model_dir().display()))
            .arg("--torch-threads=1")
            .args(serve_args);
        let proc = Proc::spawn(cmd);
        let leaders = (0..groups)
            .map(|g| format!("127.0.0.1:{}", port as usize + g))
            .collect();
        Self { proc, leaders }
    }

    /// Waits for the next "group started" line; returns the group's name and its pids.
    pub fn next_group_start(&mut self) -> (String, Vec<u32>) {
        let fields = self.proc.wait_for_log("group started");
        let group = fields
            .get("group")
            .and_then(Value::as_str)
            .expect("group field")
            .to_owned();
        let pids = fields.get("pids").and_then(Value::as_str).expect("pids field");
        let pids = pids
            .trim_matches(|c| c == '[' || c == ']')
            .split(", ")
            .map(|p| p.parse().unwrap())
            .collect();
        (group, pids)
    }
}

/// Whether a process is running (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// SIGKILLs a process by pid.
pub fn sigkill(pid: u32) {
    signal(pid, "KILL");
}

/// Sends a process the signal `name` (`TERM`, `KILL`, ...) by pid.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// The sentence-transformers reference fixture.
pub struct Reference {
    pub sentences: Vec<String>,
    pub token_counts: Vec<i64>,
    pub embeddings: Vec<Vec<f32>>,
}

pub fn reference() -> Reference {
    let path = workspace_root().join("tests/fixtures/minilm_reference.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture")).expect("fixture JSON");
    let strings = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    Reference {
        sentences: strings("sentences"),
        token_counts: v["token_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect(),
        embeddings: v["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Asserts each vector matches the reference of the same sentence with cosine >= 0.9999.
pub fn assert_matches_reference(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], sentences: &[String]) {
    assert_eq!(got.len(), want.len(), "{what}: number of embeddings");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let c = cosine(g, w);
        assert!(
            c >= 0.9999,
            "{what}: sentence {i} {:?}: cosine {c} < 0.9999",
            sentences[i]
        );
    }
}

/// A JSON array of numbers (an embedding or flat OIP `data`) as f32s.
pub fn json_f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// An OIP gRPC request for model "minilm" with one input `text`, data in raw_input_contents.
pub fn grpc_text(shape: Vec<i64>, datatype: &str, raw: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "minilm".into(),
        inputs: vec![InferInputTensor {
            name: "text".into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The sum of the samples of `name` in Prometheus text whose line contains `label`.
pub fn sample_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The body of a GET that must answer 200 (a `/metrics` scrape, say).
pub async fn get_text(url: String) -> String {
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// The JSON answer of `GET url`.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// The JSON answer of `POST url` with a JSON `body`.
pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    http.post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The groups a gateway reports at `GET {base}/admin/groups`.
pub async fn admin_groups(http: &reqwest::Client, base: &str) -> Vec<Value> {
    let v = get_json(http, &format!("{base}/admin/groups")).await;
    v["groups"].as_array().unwrap().clone()
}

/// The answer to `query`: every address in `records` as an A record (TTL 0).
fn dns_answer(query: &Message, records: &Mutex<Vec<Ipv4Addr>>) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.authoritative = true;
    for q in &query.queries {
        resp.add_query(q.clone());
        for ip in records.lock().unwrap().iter() {
            resp.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(*ip))));
        }
    }
    resp
}

/// A UDP socket and a TCP listener on one free loopback port. The kernel picks the UDP
/// port; the same TCP port may be taken (a connection of an earlier test uses it), and
/// then another port is tried.
async fn udp_and_tcp_on_one_port() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    for _ in 0..100 {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        match tokio::net::TcpListener::bind(sock.local_addr().unwrap()).await {
            Ok(tcp) => return (sock, tcp),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("bind TCP beside UDP: {e}"),
        }
    }
    panic!("no loopback port free for both UDP and TCP in 100 tries");
}

/// A minimal authoritative DNS server answering A queries from `records` (TTL 0), over
/// UDP and TCP on the same port. As real servers do, a UDP answer over 512 bytes is sent
/// truncated (TC set, no answers): the client must ask again over TCP.
pub async fn dns_server(records: Arc<Mutex<Vec<Ipv4Addr>>>) -> SocketAddr {
    let (sock, tcp) = udp_and_tcp_on_one_port().await;
    let addr = sock.local_addr().unwrap();
    let udp_records = records.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut bytes = dns_answer(&query, &udp_records).to_vec().unwrap();
            if bytes.len() > 512 {
                let mut cut = Message::response(query.metadata.id, OpCode::Query);
                cut.metadata.authoritative = true;
                cut.metadata.truncation = true;
                for q in &query.queries {
                    cut.add_query(q.clone());
                }
                bytes = cut.to_vec().unwrap();
            }
            let _ = sock.send_to(&bytes, peer).await;
        }
    });
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = tcp.accept().await {
            let records = records.clone();
            tokio::spawn(async move {
                // Each message is preceded by its length (2 bytes, big-endian).
                while let Ok(len) = conn.read_u16().await {
                    let mut buf = vec![0u8; len as usize];
                    if conn.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let Ok(query) = Message::from_vec(&buf) else {
                        return;
                    };
                    let bytes = dns_answer(&query, &records).to_vec().unwrap();
                    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&bytes);
                    if conn.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `--gguf=` the SmolLM2 file `scripts/setup.sh` unpacks.
pub fn smollm2_arg() -> String {
    let path = workspace_root().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    format!("--gguf={}", path.display())
}

/// tests/fixtures/smollm2_generation_reference.json (scripts/make_smollm2_reference.py).
pub fn smollm2_reference() -> Value {
    let path = workspace_root().join("tests/fixtures/smollm2_generation_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The reference's first case: its question and the worker's greedy answer.
pub fn smollm2_first_answer() -> (String, String) {
    let f = smollm2_reference();
    let case = &f["cases"][0];
    let question = case["messages"][0]["content"].as_str().unwrap().to_owned();
    let answer = case["greedy_text"].as_str().unwrap().replace("<|im_end|>", "");
    (question, answer)
}

/// `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The reference's cases whose greedy answer runs all 24 tokens without ending, for
/// streams that must still be under way a few steps after they start.
pub fn long_answer_cases(reference: &Value) -> Vec<Value> {
    let eos = &reference["eos_token_id"];
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            let ids = c["greedy_ids"].as_array().unwrap();
            ids.len() == 24 && !ids.contains(eos)
        })
        .cloned()
        .collect()
}
