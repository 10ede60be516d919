//! The request path never waits while there is capacity. Against a no-op model (a tiny
//! MLP), eight concurrent clients must each be served about as fast as one client alone:
//! the test fails when their median per-request time exceeds 10x the single client's,
//! measured in the same run (a ratio, not an absolute time: the machine is shared).
//! Nagle's algorithm meeting delayed ACKs, or a batch window that waits while the group
//! is idle, made eight clients 12x slower than one (about 45 ms a request) over REST.
//! Over gRPC the stall hit even one client (48 ms): the two protocols' single-client
//! medians must also stay within 10x of each other.

use std::time::{Duration, Instant};

use rankway_proto::inference::ModelInferRequest;
use rankway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_system_tests::{Gateway, Worker};
use serde_json::json;

const REQUESTS: usize = 200;
const HIDDEN: usize = 16;

fn row() -> Vec<f32> {
    (0..HIDDEN).map(|i| i as f32 / HIDDEN as f32).collect()
}

/// `REQUESTS` sequential REST inferences on one connection; their times.
async fn rest_client(url: String) -> Vec<Duration> {
    let http = reqwest::Client::new();
    let body =
        json!({"inputs": [{"name": "input", "shape": [1, HIDDEN], "datatype": "FP32", "data": row()}]});
    let mut times = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let started = Instant::now();
        let resp = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        times.push(started.elapsed());
    }
    times
}

/// `REQUESTS` sequential gRPC inferences on one HTTP/2 connection; their times.
async fn grpc_client(addr: std::net::SocketAddr) -> Vec<Duration> {
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let raw: Vec<u8> = row().iter().flat_map(|v| v.to_le_bytes()).collect();
    let req = ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, HIDDEN as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    };
    let mut times = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let started = Instant::now();
        client.model_infer(req.clone()).await.unwrap();
        times.push(started.elapsed());
    }
    times
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Median of one client alone, then of eight at once; fails past 10x.
async fn one_vs_eight<F, Fut>(protocol: &str, client: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<Duration>> + Send + 'static,
{
    client().await; // warm: connections, allocator, libtorch
    let alone = median(client().await);
    let eight: Vec<_> = (0..8).map(|_| tokio::spawn(client())).collect();
    let mut together = Vec::new();
    for t in eight {
        together.extend(t.await.unwrap());
    }
    let together = median(together);
    eprintln!("{protocol}: median {alone:?} alone, {together:?} with 8 clients");
    assert!(
        together <= alone * 10,
        "{protocol}: 8 concurrent clients take {together:?} a request, one alone {alone:?}: \
         something waits while there is capacity"
    );
    alone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_are_served_about_as_fast_as_one() {
    let worker = Worker::start(&["--model=mlp", &format!("--mlp-hidden={HIDDEN}"), "--mlp-layers=1"]);
    let gw = Gateway::start(&[&worker], &[]);
    gw.wait_model_ready("mlp").await;

    let url = gw.url("/v2/models/mlp/infer");
    let rest = one_vs_eight("REST", || rest_client(url.clone())).await;
    let grpc = one_vs_eight("gRPC", || grpc_client(gw.grpc)).await;
    assert!(
        grpc <= rest * 10 && rest <= grpc * 10,
        "one client alone: gRPC {grpc:?} a request vs REST {rest:?}; one protocol stalls"
    );
    // The no-op model's batches are short: rank 0 runs them on its gRPC thread, not
    // through a hand-off to its model thread (--inline-max).
    let batches = worker.metric_sum("rankway_worker_batches_total", "").await;
    let inline = worker.metric_sum("rankway_worker_inline_batches_total", "").await;
    assert!(
        inline >= batches / 2.0,
        "{inline} of {batches} batches ran on rank 0's gRPC thread"
    );
}
