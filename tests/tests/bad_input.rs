//! Every kind of bad input gets a clear error with the right HTTP status or gRPC code,
//! and leaves both processes healthy and serving.

use rankway_proto::codec::encode_bytes_elements;
use rankway_proto::inference::{ModelInferRequest, ModelMetadataRequest, ModelReadyRequest};
use rankway_system_tests::{Gateway, Worker, grpc_text, reference};
use serde_json::{Value, json};
use tonic::Code;

const LIMIT: usize = 64 * 1024;

async fn post(
    http: &reqwest::Client,
    url: String,
    body: impl Into<reqwest::Body>,
) -> (u16, Value, Option<String>) {
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (status, v, retry)
}

fn oip(shape: Value, datatype: &str, data: Value) -> String {
    json!({"inputs": [{"name": "text", "shape": shape, "datatype": datatype, "data": data}]}).to_string()
}

/// Asserts an OIP REST error: status and a message containing `needle`.
fn expect_oip((status, body, _): (u16, Value, Option<String>), want: u16, needle: &str) {
    assert_eq!(status, want, "body: {body}");
    let msg = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"));
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(resp) => panic!("expected an error, got {resp:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_errors_and_leave_the_servers_healthy() {
    let worker = Worker::start(&[]);
    let mut gw = Gateway::start(&[&worker], &[&format!("--max-request-bytes={LIMIT}")]);
    gw.wait_ready().await;
    let http = reqwest::Client::new();
    let (infer_url, embed_url) = (gw.url("/v2/models/minilm/infer"), gw.url("/v1/embeddings"));
    let infer = || infer_url.clone();
    let embed = || embed_url.clone();

    // Unknown model
    expect_oip(
        post(
            &http,
            gw.url("/v2/models/nope/infer"),
            oip(json!([1]), "BYTES", json!(["a"])),
        )
        .await,
        404,
        "unknown model \"nope\"",
    );
    let (s, v, _) = post(&http, embed(), json!({"model": "nope", "input": "a"}).to_string()).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["type"], "not_found_error", "{v}");
    let r = http.get(gw.url("/v2/models/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Wrong datatype, wrong shape, missing input, empty list
    expect_oip(
        post(&http, infer(), oip(json!([1]), "FP32", json!([1.0]))).await,
        400,
        "must be BYTES, got FP32",
    );
    expect_oip(
        post(&http, infer(), oip(json!([1, 1]), "BYTES", json!([["a"]]))).await,
        400,
        "has shape [1, 1]",
    );
    expect_oip(
        post(&http, infer(), oip(json!([2]), "BYTES", json!(["a"]))).await,
        400,
        "needs 2 elements, data has 1",
    );
    expect_oip(
        post(&http, infer(), json!({"inputs": []}).to_string()).await,
        400,
        "missing input \"text\"",
    );
    let wrong_name =
        json!({"inputs": [{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}).to_string();
    expect_oip(post(&http, infer(), wrong_name).await, 400, "no input \"txt\"");
    expect_oip(
        post(&http, infer(), oip(json!([0]), "BYTES", json!([]))).await,
        400,
        "is empty",
    );
    let (s, v, _) = post(
        &http,
        embed(),
        json!({"model": "minilm", "input": []}).to_string(),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must not be an empty list"),
        "{v}"
    );
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (s, v, _) = post(
        &http,
        embed(),
        json!({"model": "minilm", "input": [[1, 2, 3]]}).to_string(),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("token arrays"),
        "{v}"
    );
    let (s, v, _) = post(
        &http,
        embed(),
        json!({"model": "minilm", "input": "a", "encoding_format": "int8"}).to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // Invalid JSON
    expect_oip(
        post(&http, infer(), "{\"inputs\": [".to_owned()).await,
        400,
        "invalid JSON body",
    );
    let (s, v, _) = post(&http, embed(), "not json".to_owned()).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid JSON body"),
        "{v}"
    );
    let (s, v, _) = post(&http, embed(), json!({"input": "a"}).to_string()).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing field `model`"),
        "{v}"
    );
    // Body over the limit
    let big = "x".repeat(LIMIT + 10);
    expect_oip(
        post(&http, infer(), oip(json!([1]), "BYTES", json!([big]))).await,
        413,
        "over the limit of 65536 bytes",
    );
    let (s, v, _) = post(
        &http,
        embed(),
        json!({"model": "minilm", "input": big}).to_string(),
    )
    .await;
    assert_eq!(s, 413, "{v}");
    // A text longer than the model's window is truncated, and the usage says so.
    let long = "word ".repeat(2000);
    let (s, v, _) = post(
        &http,
        embed(),
        json!({"model": "minilm", "input": long}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 256, "{v}");

    // The same over gRPC
    let mut grpc = gw.grpc_client().await;
    let one = encode_bytes_elements(&["a"]);
    let mut unknown = grpc_text(vec![1], "BYTES", one.clone());
    unknown.model_name = "nope".into();
    let (c, m) = code(grpc.model_infer(unknown).await);
    assert_eq!((c, m.contains("unknown model")), (Code::NotFound, true), "{m}");
    let (c, _) = code(
        grpc.model_metadata(ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    let (c, _) = code(
        grpc.model_ready(ModelReadyRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    let (c, m) = code(grpc.model_infer(grpc_text(vec![1], "INT64", vec![0; 8])).await);
    assert_eq!(
        (c, m.contains("must be BYTES, got INT64")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(grpc.model_infer(grpc_text(vec![2], "BYTES", one.clone())).await);
    assert_eq!(
        (c, m.contains("holds 1 elements")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(grpc.model_infer(grpc_text(vec![0], "BYTES", vec![])).await);
    assert_eq!((c, m.contains("empty")), (Code::InvalidArgument, true), "{m}");
    let (c, m) = code(
        grpc.model_infer(grpc_text(vec![1], "BYTES", vec![7, 0, 0, 0, b'a']))
            .await,
    );
    assert_eq!(
        (c, m.contains("declares 7 bytes")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let no_input = ModelInferRequest {
        model_name: "minilm".into(),
        ..Default::default()
    };
    let (c, m) = code(grpc.model_infer(no_input).await);
    assert_eq!(
        (c, m.contains("missing input")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    // Non-UTF-8 bytes
    let (c, m) = code(
        grpc.model_infer(grpc_text(
            vec![1],
            "BYTES",
            encode_bytes_elements(&[&[0xc3u8, 0x28][..]]),
        ))
        .await,
    );
    assert_eq!(
        (c, m.contains("not valid UTF-8")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    // Message over the limit
    let huge = encode_bytes_elements(&["y".repeat(LIMIT + 10)]);
    let (c, m) = code(grpc.model_infer(grpc_text(vec![1], "BYTES", huge)).await);
    assert_eq!(
        (c, m.contains("over the limit")),
        (Code::ResourceExhausted, true),
        "{m}"
    );

    // A bad request inside a busy moment never spoils others' results.
    let r = reference();
    let good = http
        .post(infer())
        .body(oip(json!([1]), "BYTES", json!([r.sentences[0]])));
    let bad = http.post(infer()).body(oip(json!([1]), "FP32", json!([1.0])));
    let (good, bad) = tokio::join!(good.send(), bad.send());
    assert_eq!(good.unwrap().status(), 200);
    assert_eq!(bad.unwrap().status(), 400);

    // Both processes are still up and the gateway still serves.
    assert!(gw.proc.is_running(), "gateway exited:\n{}", gw.proc.log_text());
    let mut worker = worker;
    assert!(
        worker.proc.is_running(),
        "worker exited:\n{}",
        worker.proc.log_text()
    );
    let ok = http
        .post(embed())
        .json(&json!({"model": "minilm", "input": "still fine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_at_once_with_429_and_resource_exhausted() {
    let worker = Worker::start(&[]);
    // One slot in flight and a queue of one: the third concurrent request finds it full.
    let gw = Gateway::start(
        &[&worker],
        &[
            "--queue-capacity=1",
            "--max-in-flight=1",
            "--max-batch-size=1",
            "--max-queue-delay-us=0",
        ],
    );
    gw.wait_ready().await;
    let http = reqwest::Client::new();
    let texts: Vec<String> = (0..64)
        .map(|i| format!("sentence number {i} ").repeat(40))
        .collect();
    let mut tasks = Vec::new();
    for t in texts {
        let (http, url) = (http.clone(), gw.url("/v1/embeddings"));
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = http
                .post(url)
                .json(&json!({"model": "minilm", "input": t}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = resp.json().await.unwrap();
            (status, retry, body, started.elapsed())
        }));
    }
    let mut full = 0;
    let mut ok = 0;
    for t in tasks {
        let (status, retry, body, _) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                full += 1;
                assert_eq!(retry.as_deref(), Some("1"), "429 carries Retry-After");
                assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
                assert!(
                    body["error"]["message"].as_str().unwrap().contains("is full"),
                    "{body}"
                );
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 1, "some requests are served");
    assert!(
        full >= 1,
        "64 concurrent requests into a queue of 1 must overflow it"
    );

    let mut grpc = gw.grpc_client().await;
    let mut calls = Vec::new();
    for i in 0..32 {
        let mut g = grpc.clone();
        let text = format!("grpc sentence {i} ").repeat(40);
        calls.push(tokio::spawn(async move {
            g.model_infer(grpc_text(vec![1], "BYTES", encode_bytes_elements(&[text])))
                .await
                .map(|_| ())
        }));
    }
    let mut exhausted = 0;
    for c in calls {
        if let Err(s) = c.await.unwrap() {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            exhausted += 1;
        }
    }
    assert!(
        exhausted >= 1,
        "a full queue answers RESOURCE_EXHAUSTED over gRPC"
    );
    let _ = grpc
        .server_live(rankway_proto::inference::ServerLiveRequest {})
        .await
        .unwrap();
}
