//! Request ids: `x-request-id` from the client comes back in the response (REST header,
//! gRPC metadata) and is in the gateway's log lines for that request; without one (or with
//! an unusable one) the gateway makes one up and returns it; a failed request is logged at
//! warn with its id and the error. Rank 0 gets the ids of a batch's requests with the
//! batch and logs them. gRPC calls are counted in the request metrics.

use std::time::{Duration, Instant};

use rankway_proto::codec;
use rankway_system_tests::{Gateway, Proc, Worker, grpc_text};
use serde_json::{Value, json};

/// `proc`'s JSON log lines with a span whose `field` names `id`: the gateway's
/// `request_id`, or one of rank 0's comma-separated `request_ids`.
fn lines_with_id(proc: &Proc, field: &str, id: &str) -> Vec<Value> {
    let names = |span: &Value| {
        span[field]
            .as_str()
            .is_some_and(|v| v.split(',').any(|x| x == id))
    };
    proc.log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| names(&v["span"]) || v["spans"].as_array().is_some_and(|s| s.iter().any(names)))
        .collect()
}

/// Waits (the log reader is a thread) for a line with `id` and `message`; returns it.
fn wait_line(proc: &Proc, field: &str, id: &str, message: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(l) = lines_with_id(proc, field, id)
            .into_iter()
            .find(|l| l["fields"]["message"] == message)
        {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no {message:?} log line with {field} {id}:\n{}",
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_round_trip_and_reach_the_logs() {
    let worker = Worker::start_rank(&[("RUST_LOG", "info,rankway_worker::server=debug".into())], &[]);
    let gw = Gateway::start_with_env(
        &[worker.addr.to_string()],
        &[("RUST_LOG", "info,rankway_gateway::request_id=debug")],
        &[],
    );
    gw.wait_model_ready("minilm").await;
    let http = reqwest::Client::new();
    let embed = |id: Option<&str>, model: &str| {
        let mut req = http
            .post(gw.url("/v1/embeddings"))
            .json(&json!({"model": model, "input": "request ids"}));
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        req.send()
    };

    // REST, the client's id.
    let resp = embed(Some("client-id-123"), "minilm").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-id-123");
    let line = wait_line(&gw.proc, "request_id", "client-id-123", "request");
    assert_eq!(line["level"], "DEBUG");
    assert_eq!(line["fields"]["status"], 200);
    assert_eq!(line["span"]["path"], "/v1/embeddings");
    // Rank 0 got the id with the batch: its line for the batch names the request.
    let line = wait_line(&worker.proc, "request_ids", "client-id-123", "batch done");
    assert_eq!(line["span"]["name"], "rank0.Infer");

    // REST, no id: a new one, returned and logged.
    let resp = embed(None, "minilm").await.unwrap();
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 32, "{made}");
    wait_line(&gw.proc, "request_id", &made, "request");

    // REST, an unusable id (a space) is replaced.
    let resp = embed(Some("two words"), "minilm").await.unwrap();
    assert_ne!(resp.headers()["x-request-id"], "two words");

    // REST error: warn, with the id and the error's message.
    let resp = embed(Some("bad-model-789"), "nope").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-request-id"], "bad-model-789");
    let line = wait_line(&gw.proc, "request_id", "bad-model-789", "request failed");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["fields"]["kind"], "model_not_found");
    assert!(
        line["fields"]["error"].as_str().unwrap().contains("nope"),
        "{line}"
    );

    // A probe logs at debug whatever it answers, here 404 for an unknown model.
    let resp = http
        .get(gw.url("/v2/models/nope/ready"))
        .header("x-request-id", "probe-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let line = wait_line(&gw.proc, "request_id", "probe-1", "probe");
    assert_eq!(line["level"], "DEBUG");
    assert_eq!(line["fields"]["status"], 404);

    // gRPC: metadata in, metadata out, in the logs; and a gRPC error.
    let mut client = gw.grpc_client().await;
    let text = |model: &str, id: &str| {
        let mut req = grpc_text(vec![1], "BYTES", codec::encode_bytes_elements(&["grpc ids"]));
        req.model_name = model.into();
        let mut req = tonic::Request::new(req);
        req.metadata_mut().insert("x-request-id", id.parse().unwrap());
        req
    };
    let resp = client.model_infer(text("minilm", "grpc-id-456")).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "grpc-id-456");
    let line = wait_line(&gw.proc, "request_id", "grpc-id-456", "request");
    assert_eq!(line["span"]["path"], "/inference.GRPCInferenceService/ModelInfer");
    wait_line(&worker.proc, "request_ids", "grpc-id-456", "batch done");
    let err = client.model_infer(text("nope", "grpc-bad-1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "grpc-bad-1");
    let line = wait_line(&gw.proc, "request_id", "grpc-bad-1", "request failed");
    assert_eq!(line["level"], "WARN");
    assert!(
        line["fields"]["error"].as_str().unwrap().contains("nope"),
        "{line}"
    );

    // gRPC calls are counted by method and code, like REST requests by route and status.
    let method = "route=\"/inference.GRPCInferenceService/ModelInfer\"";
    for code in ["Ok", "NotFound"] {
        let label = format!("code=\"{code}\",{method}");
        assert_eq!(
            gw.metric_sum("rankway_requests_total", &label).await,
            1.0,
            "{label}"
        );
    }
}
