//! Concurrent single-text requests are batched: fewer worker batches than requests,
//! and every caller gets its own embedding back.

use rankway_proto::codec::encode_bytes_elements;
use rankway_system_tests::{
    Gateway, Worker, assert_matches_reference, f32s, grpc_text, json_f32s, reference,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_batches_and_keep_their_own_results() {
    let r = reference();
    let worker = Worker::start(&[]);
    // A wide batching window so the test does not depend on how fast clients start.
    let gw = Gateway::start(&[&worker], &["--max-queue-delay-us=50000", "--max-batch-size=16"]);
    gw.wait_ready().await;
    let before = worker.batches_completed().await;

    const N: usize = 32;
    let http = reqwest::Client::new();
    let grpc = gw.grpc_client().await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let idx = i % r.sentences.len();
        let text = r.sentences[idx].clone();
        let (http, mut grpc, url) = (http.clone(), grpc.clone(), gw.url("/v1/embeddings"));
        tasks.push(tokio::spawn(async move {
            let emb: Vec<f32> = if i % 2 == 0 {
                let v: Value = http
                    .post(url)
                    .json(&json!({"model": "minilm", "input": [text]}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                json_f32s(&v["data"][0]["embedding"])
            } else {
                let req = grpc_text(vec![1], "BYTES", encode_bytes_elements(&[text]));
                let resp = grpc.model_infer(req).await.unwrap().into_inner();
                let i = resp.outputs.iter().position(|o| o.name == "embedding").unwrap();
                f32s(&resp.raw_output_contents[i])
            };
            (idx, emb)
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    for (idx, emb) in &got {
        assert_matches_reference(
            "concurrent caller",
            std::slice::from_ref(emb),
            &r.embeddings[*idx..=*idx],
            &r.sentences[*idx..=*idx],
        );
    }
    let batches = worker.batches_completed().await - before;
    assert!(
        batches >= 2,
        "32 rows with max batch 16 need at least 2 batches, saw {batches}"
    );
    assert!(
        batches < N as u64,
        "{N} concurrent requests ran as {batches} worker batches: not batched"
    );
    eprintln!("{N} concurrent requests -> {batches} worker batches");

    // The gateway's own count of dispatched batches agrees.
    let sent = gw.metric_sum("rankway_batches_total", "").await;
    assert!(
        sent >= batches as f64,
        "gateway counted {sent} batches, worker ran {batches}"
    );
}
