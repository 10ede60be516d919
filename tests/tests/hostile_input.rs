//! Input an attacker controls, reproduced against the real binaries: names a client makes
//! up never become metric series or whole log lines; a rank 0 whose replies break its
//! model's signature fails only its own batches; a huge text or body is refused or read
//! at a bounded cost; API keys guard everything but the probes; a rank 0 with a token
//! answers only callers that carry it.

use std::time::Duration;

use rankway_proto::codec::encode_bytes_elements;
use rankway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use rankway_proto::inference::{ModelInferRequest, ModelInferResponse};
use rankway_proto::worker::{DataType, InferRequest, Tensor};
use serde_json::{Value, json};
use tonic::Code;

use rankway_system_tests::{Gateway, Worker, fake_worker, get_json, get_text, grpc_text};

/// Every made-up name carries this, so /metrics and the log can be searched for it.
const MARK: &str = "madeup";

async fn post(gateway: &Gateway, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gateway.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A batch of one input as the gateway would send it to rank 0.
pub(crate) fn batch(
    model: &str,
    (name, datatype, shape): (&str, DataType, Vec<i64>),
    data: Vec<u8>,
    request_ids: Vec<String>,
) -> InferRequest {
    InferRequest {
        batch_id: 1,
        model: model.into(),
        inputs: vec![Tensor {
            name: name.into(),
            datatype: datatype as i32,
            shape,
            data: data.into(),
        }],
        request_ids,
    }
}

async fn metrics(gateway: &Gateway) -> String {
    get_text(gateway.url("/metrics")).await
}

/// A gRPC ModelInfer naming `model`, which must fail.
pub(crate) async fn infer_refused(
    grpc: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
    model: &str,
) -> tonic::Status {
    grpc.model_infer(ModelInferRequest {
        model_name: model.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap_err()
}

/// One round of requests naming `n` models no group serves, over every front end, and
/// calling `n` gRPC methods the gateway does not have.
async fn unknown_names(gateway: &Gateway, round: usize, n: usize) {
    let mut grpc = gateway.grpc_client().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gateway.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    for i in 0..n {
        let name = format!("{MARK}-{round}-{i}");
        let oip = post(
            gateway,
            &format!("/v2/models/{name}/infer"),
            json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": vec![0.0; 16]}]}),
        )
        .await;
        assert_eq!(oip.status(), 404);
        for (path, body) in [
            ("/v1/embeddings", json!({"model": name, "input": "x"})),
            (
                "/v1/chat/completions",
                json!({"model": name, "messages": [{"role": "user", "content": "x"}]}),
            ),
        ] {
            let r = post(gateway, path, body).await;
            assert_eq!(r.status(), 404, "{path}");
        }
        assert_eq!(infer_refused(&mut grpc, &name).await.code(), Code::NotFound);
        raw.ready().await.unwrap();
        let path = format!("/{MARK}.Service{round}/Method{i}").parse().unwrap();
        let codec = tonic_prost::ProstCodec::<ModelInferRequest, ModelInferResponse>::default();
        let err = raw
            .unary(tonic::Request::new(ModelInferRequest::default()), path, codec)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
    }
}

#[tokio::test]
async fn made_up_names_never_become_metric_series_or_whole_log_lines() {
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"]);
    let mut gateway = Gateway::start(&[&worker], &[]);
    gateway.wait_model_ready("mlp").await;

    // The same series whatever the names: a second round of new names adds none. (The
    // first scrape adds /metrics's own series.)
    metrics(&gateway).await;
    unknown_names(&gateway, 0, 20).await;
    let first = metrics(&gateway).await;
    unknown_names(&gateway, 1, 100).await;
    let second = metrics(&gateway).await;
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(series(&first), series(&second), "new names added series");
    assert!(!second.contains(MARK), "a made-up name is a label value");
    assert!(
        second.contains(r#"model="unknown""#),
        "rejections of unknown models are counted"
    );
    assert!(
        second.contains(r#"route="unknown""#),
        "calls to unknown gRPC methods are counted"
    );

    // A huge name is refused before it is looked up, and never repeated.
    let huge = format!("{MARK}-{}", "x".repeat(1 << 20));
    let http = reqwest::Client::new();
    let r = post(&gateway, "/v1/embeddings", json!({"model": huge, "input": "x"})).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("at most 256"), "{msg}");
    let mut grpc = gateway.grpc_client().await;
    let err = infer_refused(&mut grpc, &huge).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 200, "{}", err.message());
    let r = post(
        &gateway,
        &format!("/v2/models/{}/infer", &huge[..60_000]),
        json!({"inputs": []}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("at most 256"), "{body}");
    assert!(!metrics(&gateway).await.contains(MARK));
    // 20 gRPC calls naming 4 MiB models (once: 190 MB more resident, for good, and a
    // /metrics of 144 MB): memory back to about where it was, /metrics the same size.
    let resident = || resident_bytes(gateway.proc.child.id());
    let (rss_before, size_before) = (resident(), metrics(&gateway).await.len());
    for i in 0..20 {
        let name = format!("{MARK}-{i}-{}", "y".repeat(4 << 20));
        assert_eq!(
            infer_refused(&mut grpc, &name).await.code(),
            Code::InvalidArgument
        );
    }
    let grown = resident().saturating_sub(rss_before);
    eprintln!("resident memory grew {} MiB after 20 names of 4 MiB", grown >> 20);
    assert!(grown < 48 << 20, "resident memory grew {} MiB", grown >> 20);
    let size_after = metrics(&gateway).await.len();
    assert!(
        size_after < size_before + 4096,
        "/metrics grew from {size_before} to {size_after} bytes"
    );
    // The three refusals are logged (each says how long the name is)...
    let log = gateway
        .proc
        .log_when("three refusals of the huge name", |l| {
            l.matches("model name is").count() >= 3
        })
        .await;
    // ...and no line repeats the name.
    assert!(
        !log.contains(&"x".repeat(300)),
        "a log line repeats most of a huge name"
    );

    // Still serving.
    let ready = get_json(&http, &gateway.url("/v2/models/mlp")).await;
    assert_eq!(ready["name"], "mlp");
    assert!(gateway.proc.is_running());
}

#[tokio::test]
async fn replies_that_break_the_signature_fail_their_batch_with_502() {
    let fake = fake_worker::start().await;
    let gateway = Gateway::start_addrs(&[fake.to_string()], &[]);
    gateway.wait_model_ready("fake").await;
    let mut grpc = gateway.grpc_client().await;
    let embed = |text: &str| {
        post(
            &gateway,
            "/v1/embeddings",
            json!({"model": "fake", "input": text}),
        )
    };
    for text in ["zero-dim", "short", "rows"] {
        let r = embed(text).await;
        assert_eq!(r.status(), 502, "{text}");
        let body: Value = r.json().await.unwrap();
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("invalid reply from a worker group"), "{text}: {msg}");
        let inputs = json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]});
        let r = post(&gateway, "/v2/models/fake/infer", inputs).await;
        assert_eq!(r.status(), 502, "{text}");
        let mut req = grpc_text(vec![1], "BYTES", encode_bytes_elements(&[text]));
        req.model_name = "fake".into();
        let err = grpc.model_infer(req).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{text}: {err:?}");
    }
    // The gateway is up and the group still takes batches: a good reply goes through.
    let r = embed("fine").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"][0]["embedding"], json!([0.5, 0.5, 0.5, 0.5]));
}

#[tokio::test]
async fn request_values_stay_out_of_answers_and_logs_and_ids_cannot_forge_lines() {
    const SECRET: &str = "SSN 123-45-6789";
    let worker = Worker::start_rank(
        &[("RUST_LOG", "info,rankway_worker=debug".into())],
        &["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"],
    );
    let gateway = Gateway::start(&[&worker], &[]);
    gateway.wait_model_ready("mlp").await;
    // Wrong types where serde_json would quote the value it found.
    for (path, body) in [
        (
            "/v1/embeddings",
            json!({"model": "mlp", "input": "x", "dimensions": SECRET}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "mlp", "messages": [], "max_tokens": SECRET}),
        ),
        (
            "/v2/models/mlp/infer",
            json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [SECRET]}]}),
        ),
        (
            "/v2/models/mlp/infer",
            json!({"inputs": [{"name": "input", "shape": SECRET, "datatype": "FP32", "data": []}]}),
        ),
    ] {
        let r = post(&gateway, path, body.clone()).await;
        assert_eq!(r.status(), 400, "{path} {body}");
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("123-45"),
            "{path}: the answer repeats the value: {text}"
        );
    }
    let log = gateway
        .proc
        .log_when("the four refusals", |l| l.matches("request failed").count() >= 4)
        .await;
    assert!(!log.contains("123-45"), "the gateway logged the value");

    // Straight at rank 0, ids the gateway would have replaced.
    let mut client = worker.client().await;
    let values: Vec<f32> = vec![0.5; 16];
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let ids = vec!["ok-1".into(), "evil\nFORGED level=ERROR \u{1b}[31m".into()];
    let req = batch("mlp", ("input", DataType::Fp32, vec![1, 16]), data, ids);
    client.infer(req).await.unwrap();
    // The batch's line names its ids, the forged one as "-".
    let log = worker
        .proc
        .log_when("the batch's ids", |l| l.contains(r#""request_ids":"ok-1,-""#))
        .await;
    assert!(!log.contains("FORGED"), "an id wrote into the worker log");
}

#[tokio::test]
async fn a_huge_text_is_refused_before_anything_tokenizes_it() {
    let worker = Worker::start(&[]);
    let gateway = Gateway::start(&[&worker], &[]);
    gateway.wait_model_ready("minilm").await;
    let huge = "word ".repeat(1 << 20); // 5 MiB: it once held the model thread for seconds
    let r = post(
        &gateway,
        "/v1/embeddings",
        json!({"model": "minilm", "input": ["short", huge]}),
    )
    .await;
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("text 1 is 5242880 bytes"), "{msg}");
    assert!(msg.contains("at most 16384 bytes"), "{msg}");

    // Rank 0 checks it too, for a client that reaches the worker port.
    let text = encode_bytes_elements(&[huge.as_str()]);
    let req = batch("minilm", ("text", DataType::Bytes, vec![1]), text, vec![]);
    let mut rank0 = rankway_proto::worker::worker_client::WorkerClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", worker.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .max_encoding_message_size(16 << 20);
    let before = peak_rss(worker.proc.child.id());
    let err = rank0.infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Refused before tokenizing: rank 0's peak memory grew by about the message, not by
    // the gigabytes an 8 MB text once took.
    let grown = peak_rss(worker.proc.child.id()).saturating_sub(before);
    assert!(grown < 64 << 20, "rank 0's peak grew {} MiB", grown >> 20);
    assert!(
        err.message().contains("text 0 is 5242880 bytes"),
        "{}",
        err.message()
    );
    // And still serves.
    let ok = post(
        &gateway,
        "/v1/embeddings",
        json!({"model": "minilm", "input": "still here"}),
    )
    .await;
    assert_eq!(ok.status(), 200);
}

/// Field `field` (in kB) of /proc/`pid`/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
    kb * 1024
}

/// Peak resident memory of process `pid` so far, in bytes.
fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM")
}

/// Resident memory of process `pid` now, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_numbers_costs_a_small_multiple_of_its_size() {
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"]);
    let gateway = Gateway::start(&[&worker], &[]);
    gateway.wait_model_ready("mlp").await;
    // Just under the 8 MiB body limit: about 4 million zeros.
    let rows = 260_000;
    let zeros = vec!["0"; rows * 16].join(",");
    let body = format!(
        r#"{{"inputs": [{{"name": "input", "shape": [{rows}, 16], "datatype": "FP32", "data": [{zeros}]}}]}}"#
    );
    let (status, text, per_body) = peak_growth(&gateway, "/v2/models/mlp/infer", body).await;
    // Parsed whole, then refused: more rows than a request may have.
    assert_eq!(status, 400);
    assert!(text.contains("at most"), "{text}");
    // serde_json::Value took over 10x; the bytes themselves are 2x (4-byte floats for
    // 2-byte "0,") besides the body and its raw `data` text.
    assert!(per_body < 6.0, "{per_body:.1}x the body");
}

/// POSTs `body` (JSON, under the 8 MiB limit) to `path`: the answer's status and text,
/// and how much the gateway's peak memory grew, per byte of the body.
async fn peak_growth(gateway: &Gateway, path: &str, body: String) -> (u16, String, f64) {
    assert!(body.len() < 8 << 20, "{} bytes", body.len());
    let before = peak_rss(gateway.proc.child.id());
    let r = reqwest::Client::new()
        .post(gateway.url(path))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let grown = peak_rss(gateway.proc.child.id()).saturating_sub(before);
    let per_body = grown as f64 / body.len() as f64;
    eprintln!(
        "{path}: peak grew {} MiB for a body of {} MiB: {per_body:.1}x",
        grown >> 20,
        body.len() >> 20
    );
    (status, text, per_body)
}

/// One MLP inference through `gateway`, which must succeed.
pub(crate) async fn assert_mlp_serves(gateway: &Gateway) {
    let body =
        json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": vec![0.5; 16]}]});
    assert_eq!(post(gateway, "/v2/models/mlp/infer", body).await.status(), 200);
}

/// A key file holding `text` in a fresh directory of its own: (directory, file).
#[tokio::test]
async fn a_batch_whose_caller_left_stops_between_sub_batches() {
    let worker = Worker::start(&[
        "--model=mlp",
        "--mlp-hidden=2048",
        "--mlp-layers=8",
        "--sub-batch-rows=1",
    ]);
    worker.wait_serving(Duration::from_secs(30)).await;
    let counter = |text: &str, name: &str| rankway_system_tests::sample_sum(text, name, "");
    let scrape = || get_text(format!("http://{}/metrics", worker.metrics));
    let before = worker.metric_sum("rankway_worker_batches_total", "").await;
    // 64 rows as 64 forward passes of a few milliseconds each, for a caller that waits 30 ms.
    let rows = 64;
    let req = batch(
        "mlp",
        ("input", DataType::Fp32, vec![rows, 2048]),
        vec![0; rows as usize * 2048 * 4],
        vec![],
    );
    let mut call = tonic::Request::new(req);
    call.set_timeout(Duration::from_millis(30));
    let err = worker.client().await.infer(call).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape().await;
        if counter(&text, "rankway_worker_abandoned_batches_total") >= 1.0 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the batch was never abandoned:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(counter(&text, "rankway_worker_abandoned_batches_total"), 1.0);
    let passes = counter(&text, "rankway_worker_batches_total") - before;
    eprintln!("{passes} of {rows} forward passes ran before the batch was abandoned");
    assert!(passes < rows as f64, "{passes} passes: the whole batch ran");

    // The group is still in step: a whole batch is answered.
    let ok = batch(
        "mlp",
        ("input", DataType::Fp32, vec![2, 2048]),
        vec![0; 2 * 2048 * 4],
        vec![],
    );
    let out = worker.client().await.infer(ok).await.unwrap().into_inner();
    assert_eq!(out.outputs[0].shape, vec![2, 2048]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_body_of_numbers_costs_a_small_multiple_of_its_size() {
    // No group needed: the body is read before the model is looked up.
    let gateway = Gateway::start_addrs(&["127.0.0.1:1".to_owned()], &[]);
    let zeros = vec!["0"; 1_900_000].join(",");
    // An informational field (accepted with any value) and a message part's unknown
    // field: both once became serde_json::Value trees.
    let body = format!(
        r#"{{"model": "nobody", "metadata": [{zeros}], "messages": [{{"role": "user", "content": [{{"type": "text", "text": "hi", "x": [{zeros}]}}]}}]}}"#
    );
    let (status, text, per_body) = peak_growth(&gateway, "/v1/chat/completions", body).await;
    assert_eq!(status, 404, "{text}");
    assert!(per_body < 6.0, "{per_body:.1}x the body");
}
