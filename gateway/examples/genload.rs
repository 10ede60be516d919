//! The streaming load generator of `make bench-generate` (k6 cannot read a stream of
//! Server-Sent Events as it arrives). `--streams` closed-loop clients each run one
//! generation at a time for `--duration` (after `--warmup`), either through the gateway
//! (`--gateway`: OpenAI `POST /v1/chat/completions` with `stream: true` over HTTP/1.1) or
//! straight at a group's rank 0 (`--worker`: `rankway.worker.v1.Worker/Generate`), on one
//! thread. Prints one JSON line: generations finished, generated tokens per second, time
//! to first token and inter-token time (p50/p99, ms). A token is counted and timed when
//! its text arrives (both paths the same way), over the measured window only; the
//! generations under way at its end are cut off there.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use rankway_proto::worker::worker_client::WorkerClient;
use rankway_proto::worker::{ChatMessage, GenerateRequest};
use serde_json::{Value, json};
use tokio::net::TcpStream;

#[path = "shared/mod.rs"]
mod shared;

#[derive(Debug, Parser)]
struct Args {
    /// The gateway's REST address.
    #[arg(long, conflicts_with = "worker", required_unless_present = "worker")]
    gateway: Option<SocketAddr>,
    /// A generative group's rank 0.
    #[arg(long)]
    worker: Option<SocketAddr>,
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Concurrent streams, each one generation at a time.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    warmup: Duration,
}

/// Questions the streams take turns with (greedy answers of different lengths).
const QUESTIONS: [&str; 4] = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a tensor-parallel group splits a transformer layer.",
    "Describe the water cycle for a school report.",
    "List some tips for staying productive when working from home.",
];

#[derive(Default)]
struct Tally {
    generations: u64,
    tokens: u64,
    ttft_us: Vec<u64>,
    itl_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// One generation through the gateway; each text delta's arrival time goes to
/// `arrivals` as it comes (so a generation cut off at the end still counts its tokens).
async fn via_gateway(
    addr: SocketAddr,
    args: &Args,
    question: &str,
    arrivals: &mut Vec<Instant>,
) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let body = json!({"model": args.model, "stream": true, "stream_options": {"include_usage": true},
                      "temperature": 0, "max_tokens": args.max_tokens,
                      "messages": [{"role": "user", "content": question}]});
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "rankway")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request");
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&text)));
    }
    let mut body = resp.into_body();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Some(data) = frame.data_ref() else { continue };
        let now = Instant::now();
        pending.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if payload == "[DONE]" {
                return Ok(());
            }
            let chunk: Value = serde_json::from_str(payload).map_err(|e| e.to_string())?;
            if let Some(e) = chunk.get("error") {
                return Err(e.to_string());
            }
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                arrivals.push(now);
            }
        }
    }
    Err("the stream ended before [DONE]".into())
}

/// One generation straight at rank 0, timed like [`via_gateway`].
async fn via_worker(
    client: &mut WorkerClient<tonic::transport::Channel>,
    args: &Args,
    question: &str,
    arrivals: &mut Vec<Instant>,
) -> Result<(), String> {
    let req = GenerateRequest {
        model: args.model.clone(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: question.as_bytes().to_vec().into(),
        }],
        max_tokens: args.max_tokens,
        ..Default::default()
    };
    let mut stream = client
        .generate(req)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(|s| s.message().to_owned())? {
        if !msg.text.is_empty() {
            arrivals.push(Instant::now());
        }
    }
    Ok(())
}

async fn run_stream(args: &Args, index: usize, measure_from: Instant, end: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut worker = match args.worker {
        Some(addr) => match WorkerClient::connect(format!("http://{addr}")).await {
            Ok(c) => Some(c),
            Err(e) => {
                tally.errors += 1;
                tally.first_error = Some(e.to_string());
                return tally;
            }
        },
        None => None,
    };
    let mut turn = index;
    while Instant::now() < end {
        let question = QUESTIONS[turn % QUESTIONS.len()];
        turn += 1;
        let sent = Instant::now();
        let mut arrivals = Vec::new();
        let generation = async {
            match (&mut worker, args.gateway) {
                (Some(client), _) => via_worker(client, args, question, &mut arrivals).await,
                (None, Some(addr)) => via_gateway(addr, args, question, &mut arrivals).await,
                (None, None) => unreachable!("clap requires one target"),
            }
        };
        // Cut off at the end; what arrived until then counts.
        let result = tokio::select! {
            r = generation => Some(r),
            _ = tokio::time::sleep_until(end.into()) => None,
        };
        let window = |t: &Instant| *t >= measure_from && *t <= end;
        tally.tokens += arrivals.iter().filter(|t| window(t)).count() as u64;
        tally.itl_us.extend(
            arrivals
                .windows(2)
                .filter(|w| window(&w[1]))
                .map(|w| (w[1] - w[0]).as_micros() as u64),
        );
        if sent >= measure_from
            && let Some(first) = arrivals.first()
        {
            tally.ttft_us.push((*first - sent).as_micros() as u64);
        }
        match result {
            Some(Ok(())) if sent >= measure_from => tally.generations += 1,
            Some(Err(e)) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
            _ => {}
        }
    }
    tally
}

fn main() {
    let args = Args::parse();
    let rt = shared::runtime();
    let measure_from = Instant::now() + args.warmup;
    let end = measure_from + args.duration;
    let tallies = rt.block_on(async {
        let runs = (0..args.streams).map(|i| run_stream(&args, i, measure_from, end));
        futures_util::future::join_all(runs).await
    });
    let mut all = Tally::default();
    for t in tallies {
        all.generations += t.generations;
        all.tokens += t.tokens;
        all.ttft_us.extend(t.ttft_us);
        all.itl_us.extend(t.itl_us);
        all.errors += t.errors;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    all.ttft_us.sort_unstable();
    all.itl_us.sort_unstable();
    // Generations finish at different times; tokens count over the measured window.
    let secs = args.duration.as_secs_f64();
    println!(
        "{}",
        json!({
            "target": if args.worker.is_some() { "worker" } else { "gateway" },
            "streams": args.streams,
            "generations": all.generations,
            "tokens": all.tokens,
            "tokens_per_sec": all.tokens as f64 / secs,
            "ttft_p50_ms": shared::percentile_ms(&all.ttft_us, 0.5),
            "ttft_p99_ms": shared::percentile_ms(&all.ttft_us, 0.99),
            "itl_p50_ms": shared::percentile_ms(&all.itl_us, 0.5),
            "itl_p99_ms": shared::percentile_ms(&all.itl_us, 0.99),
            "errors": all.errors,
            "first_error": all.first_error,
        })
    );
}
