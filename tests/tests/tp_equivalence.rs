//! Tensor parallelism over real Gloo on loopback: groups of world size 2 and 3 (MiniLM)
//! and 4 and 6 (MLP) give the same outputs as world size 1 (max abs difference <= 1e-5),
//! through the gateway; MiniLM still matches the sentence-transformers reference.

use rankway_system_tests::{Gateway, Worker, assert_matches_reference, json_f32s, reference};
use serde_json::{Value, json};

const TOLERANCE: f32 = 1e-5;

async fn infer(http: &reqwest::Client, gw: &Gateway, model: &str, body: &Value) -> Vec<f32> {
    let resp = http
        .post(gw.url(&format!("/v2/models/{model}/infer")))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{model}");
    let v: Value = resp.json().await.unwrap();
    json_f32s(&v["outputs"][0]["data"])
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Starts one group per world size, each serving `kind` under the name `{kind}-tp{world}`.
fn groups(kind: &str, worlds: &[usize], extra: &[&str]) -> Vec<Vec<Worker>> {
    worlds
        .iter()
        .map(|&w| {
            let name = format!("--model-name={kind}-tp{w}");
            let mut args = vec!["--model", kind, name.as_str()];
            args.extend_from_slice(extra);
            Worker::start_group(w, &args)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_groups_of_2_and_3_ranks_equal_one_rank() {
    let r = reference();
    const KIND: &str = "minilm";
    const WORLDS: [usize; 3] = [1, 2, 3];
    // 64 tokens a pass: every rank runs the reference batch as three passes, longest
    // first and cut to their own length, and rank 0 puts the rows back in order.
    let all = groups(KIND, &WORLDS, &["--sub-batch-tokens=64"]);
    let leaders: Vec<&Worker> = all.iter().map(|g| &g[0]).collect();
    let gw = Gateway::start(&leaders, &[]);
    gw.wait_ready().await;
    for (g, world) in all.iter().zip(WORLDS) {
        g[0].wait_serving(std::time::Duration::from_secs(60)).await;
        gw.wait_model_ready(&format!("{KIND}-tp{world}")).await;
    }
    let http = reqwest::Client::new();
    let body = json!({
        "inputs": [{"name": "text", "shape": [r.sentences.len()], "datatype": "BYTES", "data": r.sentences}],
        "outputs": [{"name": "embedding"}],
    });
    let base = infer(&http, &gw, "minilm-tp1", &body).await;
    for world in [2, 3] {
        let got = infer(&http, &gw, &format!("minilm-tp{world}"), &body).await;
        let diff = max_abs_diff(&got, &base);
        eprintln!("minilm world {world}: max abs diff vs world 1 = {diff:e}");
        assert!(
            diff <= TOLERANCE,
            "world {world}: max abs diff {diff} > {TOLERANCE}"
        );
        let rows: Vec<Vec<f32>> = got.chunks(384).map(<[f32]>::to_vec).collect();
        assert_matches_reference(&format!("minilm tp{world}"), &rows, &r.embeddings, &r.sentences);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlp_groups_of_4_and_6_ranks_equal_one_rank() {
    // hidden 96: the inner width 384 divides by 1, 4 and 6.
    const KIND: &str = "mlp";
    const WORLDS: [usize; 3] = [1, 4, 6];
    // --inline-max=1s: every batch is short enough to run on rank 0's gRPC thread, so
    // only the group's size decides whether it does.
    let all = groups(
        KIND,
        &WORLDS,
        &["--mlp-hidden=96", "--mlp-layers=3", "--inline-max=1s"],
    );
    let leaders: Vec<&Worker> = all.iter().map(|g| &g[0]).collect();
    let gw = Gateway::start(&leaders, &[]);
    gw.wait_ready().await;
    for (g, world) in all.iter().zip(WORLDS) {
        g[0].wait_serving(std::time::Duration::from_secs(60)).await;
        gw.wait_model_ready(&format!("{KIND}-tp{world}")).await;
    }
    let http = reqwest::Client::new();
    let rows = 5;
    let data: Vec<f32> = (0..rows * 96)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    let body = json!({"inputs": [{"name": "input", "shape": [rows, 96], "datatype": "FP32", "data": data}]});
    let base = infer(&http, &gw, "mlp-tp1", &body).await;
    assert!(
        base.iter().any(|v| v.abs() > 0.1),
        "the MLP computes something non-trivial"
    );
    for world in [4, 6] {
        let got = infer(&http, &gw, &format!("mlp-tp{world}"), &body).await;
        let diff = max_abs_diff(&got, &base);
        eprintln!("mlp world {world}: max abs diff vs world 1 = {diff:e}");
        assert!(
            diff <= TOLERANCE,
            "world {world}: max abs diff {diff} > {TOLERANCE}"
        );
    }
    // A group of one ran its batch on rank 0's gRPC thread; a group of several never
    // does, since its forward waits on the other ranks.
    for (g, world) in all.iter().zip(WORLDS) {
        let inline = g[0].metric_sum("rankway_worker_inline_batches_total", "").await;
        assert_eq!(inline, if world == 1 { 1.0 } else { 0.0 }, "world {world}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_size_that_does_not_divide_the_heads_is_refused_at_start() {
    // 12 heads over 5 ranks: rank 0 must refuse before waiting for anyone.
    let env = [
        ("RANK", "0".to_owned()),
        ("WORLD_SIZE", "5".to_owned()),
        ("MASTER_PORT", rankway_system_tests::free_port().to_string()),
    ];
    let mut w = Worker::start_rank(&env, &[]);
    let status = tokio::task::spawn_blocking(move || {
        let s = w.proc.child.wait().unwrap();
        (s, w.proc.log_text())
    })
    .await
    .unwrap();
    assert!(!status.0.success(), "rank 0 must exit non-zero");
    assert!(
        status
            .1
            .contains("world size 5 does not divide the attention heads (12)"),
        "log:\n{}",
        status.1
    );
}
