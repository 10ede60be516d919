//! The model version an answer names is that of the group that ran its batch: two groups
//! serve the same model as different versions, and over REST and gRPC each answer's
//! `model_version` agrees, request for request, with the batches each group was sent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rankway_proto::inference::ModelInferRequest;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_system_tests::{Gateway, Worker, admin_groups, get_json, post_json};
use serde_json::json;

const MLP: [&str; 3] = ["--model=mlp", "--mlp-hidden=8", "--mlp-layers=1"];

fn grpc_row() -> ModelInferRequest {
    let raw: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 8],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_answered_is_the_one_that_ran_the_batch() {
    let a = Worker::start(&[&MLP[..], &["--model-version=2024-a"]].concat());
    let b = Worker::start(&[&MLP[..], &["--model-version=2025-b"]].concat());
    let gw = Gateway::start(&[&a, &b], &[]);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !admin_groups(&http, &gw.url(""))
        .await
        .iter()
        .all(|g| g["ready"] == true)
    {
        assert!(Instant::now() < deadline, "both groups ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let version_of = HashMap::from([("g0", "2024-a"), ("g1", "2025-b")]);

    // One request at a time: every request is a batch of its own.
    let mut grpc = gw.grpc_client().await;
    let mut answered: HashMap<String, f64> = HashMap::new();
    for i in 0..60 {
        let version = if i % 2 == 0 {
            let row = json!({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5, 6, 7]}]});
            let v = post_json(&http, &gw.url("/v2/models/mlp/infer"), &row).await;
            v["model_version"].as_str().unwrap().to_owned()
        } else {
            grpc.model_infer(grpc_row())
                .await
                .unwrap()
                .into_inner()
                .model_version
        };
        *answered.entry(version).or_default() += 1.0;
    }
    for (group, version) in &version_of {
        let sent = gw
            .metric_sum("rankway_batches_total", &format!("group=\"{group}\""))
            .await;
        let got = answered.get(*version).copied().unwrap_or(0.0);
        assert!(sent > 0.0, "P2C spreads 60 sequential requests over both groups");
        assert_eq!(
            got, sent,
            "answers naming {version} ({got}) = batches group {group} ran ({sent}); all answers: {answered:?}"
        );
    }
    assert_eq!(answered.values().sum::<f64>(), 60.0, "{answered:?}");

    // Metadata lists the model's version as some group reports it.
    let meta = get_json(&http, &gw.url("/v2/models/mlp")).await;
    let listed = meta["versions"][0].as_str().unwrap();
    assert!(version_of.values().any(|v| *v == listed), "{meta}");
}
