//! Worker ranks and groups: one `rankway-worker serve`, a `launch`ed group, their health.

use rankway_proto::worker::worker_client::WorkerClient;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

use crate::*;

pub fn model_dir() -> PathBuf {
    let dir = workspace_root().join("models/minilm");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/setup.sh",
        dir.display()
    );
    dir
}

/// One `rankway-worker serve` process (a group of one rank).
/// SmolLM2 ranks in these tests hold float32 matrices: the reference's numerics, which
/// the answers are compared with. (`auto` picks bfloat16 or float16 by the CPU; the
/// worker's unit tests hold each kind to the reference within its tolerance, and the image
/// smoke run in scripts/build_images.sh serves a chat completion with it.)
pub const FLOAT32: &str = "f32";

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
            .env("RANKWAY_WEIGHTS", FLOAT32)
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
            .env("RANKWAY_WEIGHTS", FLOAT32)
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

/// `--gguf=` the SmolLM2 file `scripts/setup.sh` unpacks.
pub fn smollm2_arg() -> String {
    let path = workspace_root().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    format!("--gguf={}", path.display())
}
