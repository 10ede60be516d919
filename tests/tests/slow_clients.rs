//! Slow, silent and numerous clients against the real binaries (issue 14, finding 5):
//! every listener (gateway REST and gRPC, the worker's gRPC and metrics ports) closes a
//! connection that sends nothing or dribbles a request head, holds at most
//! `--max-connections`, and a REST body that never arrives is answered 408; normal
//! requests meanwhile keep being served. An HTTP/1.1 keep-alive connection waits
//! `--keep-alive-timeout` for its next request, but a head begun on it must still
//! finish within `--header-timeout`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use rankway_system_tests::{Gateway, Worker, get_text, sample_sum};

/// Small model, short timeouts: the header deadline is 1 s on every listener.
const MLP: [&str; 3] = ["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"];
const SHORT: [&str; 2] = ["--header-timeout=1s", "--body-timeout=1s"];

/// How long after `start` the server closed `conn` (read end or reset); `None` if it
/// was still open after `within`. Whatever the server sent before closing is returned.
async fn closed_after(conn: &mut TcpStream, start: Instant, within: Duration) -> Option<(Duration, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((start.elapsed(), got)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An HTTP/1.1 request head sent one byte every 200 ms, until the server closes.
async fn slowloris(addr: SocketAddr) -> Option<Duration> {
    let start = Instant::now();
    let conn = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = conn.into_split();
    let dribble = async move {
        for b in b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\nx-pad: "
            .iter()
            .chain([b'a'; 4096].iter())
        {
            if write.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::future::pending::<()>().await;
    };
    let closed = async {
        let mut buf = [0u8; 256];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            () = dribble => unreachable!(),
            t = closed => t,
        }
    })
    .await
    .ok()
}

async fn infer_ms(http: &reqwest::Client, gateway: &Gateway) -> f64 {
    let start = Instant::now();
    let r = http
        .post(gateway.url("/v2/models/mlp/infer"))
        .json(&json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": vec![0.5; 16]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    start.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_dribbling_connections_are_closed_on_every_listener() {
    let worker = Worker::start(&[&MLP[..], &SHORT[..1]].concat());
    let gateway = Gateway::start(&[&worker], &SHORT);
    gateway.wait_model_ready("mlp").await;
    let http = reqwest::Client::new();
    let mut before = Vec::new();
    for _ in 0..30 {
        before.push(infer_ms(&http, &gateway).await);
    }

    let listeners = [gateway.http, gateway.grpc, worker.addr, worker.metrics];
    let start = Instant::now();
    let mut silent = Vec::new();
    for addr in listeners {
        for _ in 0..25 {
            silent.push((addr, TcpStream::connect(addr).await.unwrap()));
        }
    }
    let dribblers: Vec<_> = (0..25).map(|_| tokio::spawn(slowloris(gateway.http))).collect();
    // Normal requests go on meanwhile, on their own connection.
    let mut during = Vec::new();
    while start.elapsed() < Duration::from_millis(900) {
        during.push(infer_ms(&http, &gateway).await);
    }
    for (addr, conn) in &mut silent {
        let closed = closed_after(conn, start, Duration::from_secs(6)).await;
        let (after, sent) = closed.unwrap_or_else(|| panic!("a silent connection to {addr} stayed open"));
        assert!(
            after >= Duration::from_millis(900),
            "{addr} closed after {after:?}, before its deadline"
        );
        // A silent connection gets nothing, or at most HTTP/2's greeting or an HTTP 408.
        let text = String::from_utf8_lossy(&sent);
        assert!(
            sent.is_empty() || text.starts_with("HTTP/1.1 408") || sent.len() < 128,
            "{addr}: {text:?}"
        );
    }
    for d in dribblers {
        let after = d
            .await
            .unwrap()
            .expect("a dribbling request head was never cut off");
        // Each byte comes within 200 ms; only the 1 s header deadline closes it.
        assert!(after < Duration::from_secs(5), "closed after {after:?}");
    }

    let (b, d) = (median(before), median(during));
    eprintln!("normal requests: median {b:.2} ms before, {d:.2} ms during the attack");
    assert!(
        d < b * 10.0 + 5.0,
        "normal requests slowed from {b:.2} to {d:.2} ms"
    );
    let metrics = get_text(gateway.url("/metrics")).await;
    assert!(
        sample_sum(
            &metrics,
            "rankway_connections_timed_out_total",
            r#"listener="rest""#
        ) >= 50.0
    );
    assert!(
        sample_sum(
            &metrics,
            "rankway_connections_timed_out_total",
            r#"listener="grpc""#
        ) >= 25.0
    );
    let worker_metrics = get_text(format!("http://{}/metrics", worker.metrics)).await;
    for listener in ["grpc", "metrics"] {
        let label = format!(r#"listener="{listener}""#);
        let n = sample_sum(
            &worker_metrics,
            "rankway_worker_connections_timed_out_total",
            &label,
        );
        assert!(n >= 25.0, "{listener}: {n}");
    }
    // Still serving.
    infer_ms(&http, &gateway).await;
}

#[tokio::test]
async fn a_connection_over_the_cap_is_closed_at_once_and_the_cap_frees() {
    let worker = Worker::start(&MLP);
    let gateway = Gateway::start(&[&worker], &["--max-connections=4", "--header-timeout=30s"]);
    gateway.wait_model_ready("mlp").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(gateway.grpc).await.unwrap());
    }
    // The 4 are accepted (the gateway sees them open) before the fifth comes.
    let open = r#"listener="grpc""#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while gateway.metric_sum("rankway_connections_open", open).await < 4.0 {
        assert!(
            Instant::now() < deadline,
            "the held connections were never accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    let mut fifth = TcpStream::connect(gateway.grpc).await.unwrap();
    let (after, _) = closed_after(&mut fifth, start, Duration::from_secs(2))
        .await
        .expect("a connection over the cap was left open");
    eprintln!("over the cap: closed after {after:?}");
    assert_eq!(
        gateway
            .metric_sum("rankway_connections_refused_total", open)
            .await,
        1.0
    );

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tonic::transport::Channel::from_shared(format!("http://{}", gateway.grpc))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => {
                let mut client =
                    rankway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
                        channel,
                    );
                if client
                    .server_live(rankway_proto::inference::ServerLiveRequest {})
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            Err(e) => assert!(Instant::now() < deadline, "the cap never freed: {e}"),
        }
        assert!(Instant::now() < deadline, "the cap never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_body_that_never_arrives_is_answered_408() {
    let worker = Worker::start(&MLP);
    let gateway = Gateway::start(&[&worker], &SHORT);
    gateway.wait_model_ready("mlp").await;
    let mut conn = TcpStream::connect(gateway.http).await.unwrap();
    conn.write_all(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("no answer to a body that never came")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the request body did not arrive within 1s"),
        "{answer}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn grpc_listeners_advertise_their_stream_limit() {
    let worker = Worker::start(&[&MLP[..], &["--http2-max-streams=7"]].concat());
    let gateway = Gateway::start(&[&worker], &["--http2-max-streams=5"]);
    for (addr, want) in [(gateway.grpc, 5), (worker.addr, 7)] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        // Any request: its answer comes after the server's SETTINGS.
        let req = http::Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (resp, mut body) = client.send_request(req, false).unwrap();
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        resp.await.unwrap();
        assert_eq!(client.current_max_send_streams(), want, "{addr}");
    }
}

/// Reads one HTTP/1.1 answer (head and a `content-length` body) off `conn`.
async fn read_answer(conn: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed mid-answer: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn keep_alive_outlasts_the_header_timeout_but_a_slow_head_does_not() {
    // No group need be up: /v2/health/live is the gateway's own.
    let gateway = Gateway::start_addrs(
        &["127.0.0.1:1".to_owned()],
        &["--header-timeout=1s", "--keep-alive-timeout=4s"],
    );
    let slow = || gateway.metric_sum("rankway_connections_timed_out_total", r#"listener="rest""#);
    let live = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n";

    // Idle for twice the header timeout, then reused: still open.
    let mut conn = TcpStream::connect(gateway.http).await.unwrap();
    conn.write_all(live).await.unwrap();
    assert!(read_answer(&mut conn).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    conn.write_all(live).await.unwrap();
    let answer = read_answer(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Then left idle: closed once the keep-alive timeout has passed, and not counted
    // as a slow client.
    let start = Instant::now();
    let (after, sent) = closed_after(&mut conn, start, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection stayed open past its timeout");
    assert!(
        after >= Duration::from_millis(3500) && sent.is_empty(),
        "closed after {after:?}, having sent {sent:?}"
    );
    assert_eq!(slow().await, 0.0, "a keep-alive timeout counted as a slow client");

    // A head begun on a kept-alive connection and never finished: cut off by the
    // header timeout from its first byte, long before the keep-alive timeout.
    let mut conn = TcpStream::connect(gateway.http).await.unwrap();
    conn.write_all(live).await.unwrap();
    assert!(read_answer(&mut conn).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.write_all(b"GET /v2/health/live HTTP/1.1\r\nho")
        .await
        .unwrap();
    let start = Instant::now();
    let (after, _) = closed_after(&mut conn, start, Duration::from_secs(10))
        .await
        .expect("an unfinished head was never cut off");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(3000),
        "an unfinished head was cut off after {after:?}"
    );
    assert_eq!(slow().await, 1.0);
}
