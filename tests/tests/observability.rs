//! Traces and metrics end to end: a real OTLP/gRPC receiver on loopback (the generated
//! `opentelemetry-proto` TraceService), a 2-rank group and the gateway exporting to it,
//! one REST request carrying a W3C `traceparent`. Every process's spans must arrive in
//! that trace with the documented parent/link structure; then both `/metrics` outputs,
//! after that real traffic, must pass `promtool check metrics`.

use std::time::{Duration, Instant};

use rankway_system_tests::otlp::{Span, start_receiver};
use rankway_system_tests::{Gateway, Worker, free_port, get_text, promtool, sample_sum};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trace_reaches_every_rank_and_metrics_lint_clean() {
    let (endpoint, receiver) = start_receiver().await;
    let otel = [("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned())];
    let master_port = free_port().to_string();
    let ranks: Vec<Worker> = (0..2)
        .map(|rank| {
            let mut env = vec![
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", "2".to_owned()),
                ("MASTER_ADDR", "127.0.0.1".to_owned()),
                ("MASTER_PORT", master_port.clone()),
                ("RANKWAY_GROUP", "traced".to_owned()),
            ];
            env.extend(otel.iter().cloned());
            Worker::start_rank(&env, &[&format!("--otlp-endpoint={endpoint}")])
        })
        .collect();
    let gw = Gateway::start_with_env(
        &[ranks[0].addr.to_string()],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("RUST_LOG", "info,rankway_gateway::request_id=debug"),
        ],
        &[&format!("--otlp-endpoint={endpoint}")],
    );
    gw.wait_model_ready("minilm").await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/embeddings"))
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .header("x-request-id", "traced-1")
        .json(&json!({"model": "minilm", "input": "where does the time go"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Spans arrive in batches (every 100 ms here); wait for the follower's too.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<Span> = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect();
        let rank1_forward = spans
            .iter()
            .any(|s| s.name == "forward" && s.attrs.get("rank").map(String::as_str) == Some("1"));
        let gateway_request = spans.iter().any(|s| s.attrs.contains_key("request_id"));
        if rank1_forward && gateway_request {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace} so far: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let one = |service: &str, name: &str, rank: Option<&str>| -> Span {
        let found: Vec<&Span> = spans
            .iter()
            .filter(|s| {
                s.service == service
                    && s.name == name
                    && rank.is_none_or(|r| s.attrs.get("rank").map(String::as_str) == Some(r))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {service} {name} (rank {rank:?}) in {spans:#?}"
        );
        found[0].clone()
    };

    // Gateway: request ← client; queue ← request; batch ← request and linked to it;
    // worker.Infer ← batch.
    let request = one("rankway-gateway", "POST /v1/embeddings", None);
    assert_eq!(request.parent, client_span);
    assert_eq!(request.attrs["request_id"], "traced-1");
    let queue = one("rankway-gateway", "queue", None);
    assert_eq!(queue.parent, request.span_id);
    let batch = one("rankway-gateway", "batch", None);
    assert_eq!(batch.parent, request.span_id);
    assert!(
        batch.links.contains(&(trace.to_owned(), request.span_id.clone())),
        "{batch:?}"
    );
    assert_eq!(batch.attrs["model"], "minilm");
    assert_eq!(batch.attrs["batch_size"], "1");
    assert_eq!(batch.attrs["group"], "g0");
    let call = one("rankway-gateway", "worker.Infer", None);
    assert_eq!(call.parent, batch.span_id);

    // Rank 0: its gRPC handling ← the gateway's call; its forward ← that.
    let handling = one("rankway-worker", "rank0.Infer", None);
    assert_eq!(handling.parent, call.span_id);
    assert_eq!(handling.attrs["batch_id"], batch.attrs["batch_id"]);
    let forward0 = one("rankway-worker", "forward", Some("0"));
    assert_eq!(forward0.parent, handling.span_id);
    // Rank 1: its forward ← rank 0's forward, through the step header.
    let forward1 = one("rankway-worker", "forward", Some("1"));
    assert_eq!(forward1.parent, forward0.span_id);
    assert_eq!(forward1.attrs["batch_id"], batch.attrs["batch_id"]);
    // Collectives on both ranks, each under its own rank's forward.
    for (rank, fwd) in [("0", &forward0), ("1", &forward1)] {
        let collectives: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == "collective" && s.attrs.get("rank").map(String::as_str) == Some(rank))
            .collect();
        // MiniLM: the inputs' broadcasts and two all-reduces per layer (6 layers).
        assert!(
            collectives.len() >= 12,
            "rank {rank}: {} collective spans",
            collectives.len()
        );
        assert!(collectives.iter().all(|c| c.parent == fwd.span_id), "rank {rank}");
    }

    // The request's log line carries the trace id (the log reader is a thread: retry).
    let deadline = Instant::now() + Duration::from_secs(5);
    let has_line = |gw: &Gateway| {
        gw.proc.log.lock().unwrap().iter().any(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["span"]["request_id"] == "traced-1" && v["span"]["trace_id"] == trace)
        })
    };
    while !has_line(&gw) {
        assert!(
            Instant::now() < deadline,
            "no log line with request id and trace id:\n{}",
            gw.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Metrics after real traffic: lint clean, and the series operators need are there.
    let gateway_metrics = get_text(gw.url("/metrics")).await;
    promtool("the gateway", &gateway_metrics);
    assert!(
        sample_sum(
            &gateway_metrics,
            "rankway_batch_fill_delay_seconds_count",
            "minilm"
        ) >= 1.0
    );
    assert_eq!(
        sample_sum(
            &gateway_metrics,
            "rankway_group_breaker_state",
            "state=\"closed\""
        ),
        1.0
    );
    assert_eq!(
        sample_sum(&gateway_metrics, "rankway_group_ready", "group=\"g0\""),
        1.0
    );
    assert_eq!(
        sample_sum(&gateway_metrics, "rankway_group_ranks_ready", "group=\"g0\""),
        2.0
    );
    for (rank, w) in ranks.iter().enumerate() {
        let text = get_text(format!("http://{}/metrics", w.metrics)).await;
        promtool(&format!("rank {rank}"), &text);
        let label = format!("rank=\"{rank}\"");
        // The warm-up batch and ours, at least.
        assert!(
            sample_sum(&text, "rankway_worker_forward_seconds_count", &label) >= 2.0,
            "{text}"
        );
        assert!(
            sample_sum(
                &text,
                "rankway_worker_collective_seconds_count",
                "op=\"all_reduce\""
            ) >= 12.0,
            "{text}"
        );
        assert_eq!(sample_sum(&text, "rankway_worker_ready", &label), 1.0, "{text}");
    }
}

#[tokio::test]
async fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    use rankway_system_tests::{Proc, gateway_bin, worker_bin};
    let mut worker = std::process::Command::new(worker_bin());
    worker
        .args(["serve", "--model=mlp", "--torch-threads=1", "--log-format=text"])
        .args(["--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"]);
    let worker = Proc::spawn(worker);
    let mut gateway = std::process::Command::new(gateway_bin());
    gateway.args([
        "--http-listen=127.0.0.1:0",
        "--grpc-listen=127.0.0.1:0",
        "--group=g=127.0.0.1:1",
        "--log-format=text",
    ]);
    let gateway = Proc::spawn(gateway);
    for (what, proc, line) in [
        ("worker", &worker, "worker listening"),
        ("gateway", &gateway, "gateway listening"),
    ] {
        let log = proc.log_when(line, |log| log.contains(line)).await;
        assert!(log.contains(" INFO "), "{what}: a text log, not JSON:\n{log}");
        assert!(
            !log.contains('\u{1b}'),
            "{what}: colour codes in a piped log:\n{log:?}"
        );
    }
}
