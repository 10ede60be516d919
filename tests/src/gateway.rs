//! The gateway process and the HTTP calls the tests make of it.

use rankway_proto::inference::ModelInferRequest;
use rankway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

use crate::*;

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
        let mut cmd = Command::new(gateway_bin());
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

/// `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}
