//! A lean closed-loop (or paced) load generator for `make bench-overhead` and `make
//! bench`: one thread, `--connections` connections, each with one request outstanding at
//! a time; OIP v2 inference of one FP32 row (or, with `--text`, one BYTES text) over REST
//! (`POST /v2/models/{m}/infer`, HTTP/1.1 keep-alive) or gRPC (`ModelInfer`, one HTTP/2
//! connection per client). Prints one JSON line: requests, errors, req/s, p50/p99/max
//! latency in ms.
//!
//! It exists because k6's JavaScript costs more CPU than the gateway on 2 cores; like
//! wrk it runs on one thread. With `--rate` requests go out evenly spaced, each on the
//! next idle connection (see `pace`); latency is measured from the send.
//!
//! Its gRPC client is the `h2` crate's, with the request message encoded once. A tonic
//! `Channel` adds a buffer task to every call, and hyper's HTTP/2 client, under it,
//! passes each request through a channel to the connection's task and spawns a task for
//! its answer. On the same two cores as the gateway under test, at 8 connections, the
//! load generator spent 36–38 µs of CPU a gRPC request through tonic, 32 through hyper
//! and 18–19 through h2 (12–14 µs a REST request). Each answer is still checked: HTTP
//! 200, `grpc-status` 0, and one uncompressed `ModelInferResponse` that decodes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use prost::Message;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_proto::inference::{ModelInferRequest, ModelInferResponse};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[path = "shared/mod.rs"]
mod shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Rest,
    Grpc,
}

#[derive(Debug, Parser)]
struct Args {
    /// Protocol to load the gateway with.
    #[arg(long, value_enum)]
    protocol: Protocol,
    /// The gateway's REST or gRPC address.
    #[arg(long)]
    addr: SocketAddr,
    /// Model to call; its one input is FP32 [1, --hidden].
    #[arg(long, default_value = "mlp")]
    model: String,
    #[arg(long, default_value = "input")]
    input: String,
    #[arg(long, default_value_t = 16)]
    hidden: usize,
    /// Send this text as a BYTES input of shape [1] instead of an FP32 row (MiniLM's
    /// `text` input).
    #[arg(long)]
    text: Option<String>,
    /// Concurrent connections, one request outstanding on each.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// How long to measure (after --warmup).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Requests sent before measuring starts (connections set up, caches warm).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Total requests per second to pace to (default: as fast as answers come).
    #[arg(long)]
    rate: Option<f64>,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

enum Client {
    Rest(
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        Bytes,
        String,
    ),
    /// The request as one gRPC message frame (flag, length, message).
    Grpc(h2::client::SendRequest<Bytes>, Bytes),
}

/// `ModelInfer`; the authority is any name (the gateway routes on the path).
const MODEL_INFER: &str = "http://rankway/inference.GRPCInferenceService/ModelInfer";

async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(tcp)
}

/// A gRPC message as its length-prefixed frame, uncompressed.
fn grpc_frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut frame = Vec::with_capacity(5 + len);
    frame.push(0);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode(&mut frame).expect("a Vec grows");
    frame.into()
}

/// The outcome of a gRPC call: `grpc-status` from the trailers, or from the headers of
/// a trailers-only answer, and the one message a unary answer carries.
async fn grpc_answer(response: h2::client::ResponseFuture) -> Result<(), String> {
    let (parts, mut body) = response.await.map_err(|e| e.to_string())?.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(format!("HTTP {}", parts.status));
    }
    let mut message = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| parts.headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    match field("grpc-status").as_deref() {
        Some("0") => {}
        Some(code) => {
            return Err(format!(
                "grpc-status {code}: {}",
                field("grpc-message").unwrap_or_default()
            ));
        }
        None => return Err("no grpc-status".into()),
    }
    match message.get(5..) {
        Some(m) if message[0] == 0 => ModelInferResponse::decode(m)
            .map(|_| ())
            .map_err(|e| format!("undecodable ModelInferResponse: {e}")),
        _ => Err(format!(
            "not one uncompressed gRPC message ({} bytes)",
            message.len()
        )),
    }
}

/// The one input tensor every request carries: (datatype, shape, JSON data, raw bytes).
fn input(args: &Args) -> (&'static str, Vec<i64>, serde_json::Value, Vec<u8>) {
    match &args.text {
        Some(text) => {
            let mut raw = (text.len() as u32).to_le_bytes().to_vec();
            raw.extend_from_slice(text.as_bytes());
            ("BYTES", vec![1], serde_json::json!([text]), raw)
        }
        None => {
            let row: Vec<f32> = (0..args.hidden).map(|i| i as f32 / args.hidden as f32).collect();
            let raw = row.iter().flat_map(|v| v.to_le_bytes()).collect();
            ("FP32", vec![1, args.hidden as i64], serde_json::json!(row), raw)
        }
    }
}

impl Client {
    async fn connect(args: &Args) -> Result<Self, String> {
        let (datatype, shape, data, raw) = input(args);
        match args.protocol {
            Protocol::Rest => {
                let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(
                    connect_tcp(args.addr).await?,
                ))
                .await
                .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let body = serde_json::json!({"inputs": [{
                    "name": args.input, "shape": shape, "datatype": datatype, "data": data}]});
                let path = format!("/v2/models/{}/infer", args.model);
                Ok(Client::Rest(send, Bytes::from(body.to_string()), path))
            }
            Protocol::Grpc => {
                let (send, conn) = h2::client::handshake(connect_tcp(args.addr).await?)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let req = ModelInferRequest {
                    model_name: args.model.clone(),
                    inputs: vec![InferInputTensor {
                        name: args.input.clone(),
                        datatype: datatype.into(),
                        shape,
                        ..Default::default()
                    }],
                    raw_input_contents: vec![raw.into()],
                    ..Default::default()
                };
                Ok(Client::Grpc(send, grpc_frame(&req)))
            }
        }
    }

    async fn call(&mut self) -> Result<(), String> {
        match self {
            Client::Rest(send, body, path) => {
                send.ready().await.map_err(|e| e.to_string())?;
                let req = http::Request::post(path.as_str())
                    .header("host", "rankway")
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("valid request");
                let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp.into_body().collect().await.map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("{status}: {}", String::from_utf8_lossy(&body.to_bytes())));
                }
                Ok(())
            }
            Client::Grpc(send, frame) => {
                let req = http::Request::post(MODEL_INFER)
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .expect("valid request");
                let mut ready = send.clone().ready().await.map_err(|e| e.to_string())?;
                let (response, mut body) = ready.send_request(req, false).map_err(|e| e.to_string())?;
                body.send_data(frame.clone(), true).map_err(|e| e.to_string())?;
                grpc_answer(response).await
            }
        }
    }
}

async fn run_connection(
    args: &Args,
    tickets: Option<&Semaphore>,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut client = match Client::connect(args).await {
        Ok(c) => c,
        Err(e) => {
            tally.errors += 1;
            tally.first_error = Some(e);
            return tally;
        }
    };
    loop {
        if let Some(tickets) = tickets {
            match tickets.acquire().await {
                Ok(ticket) => ticket.forget(),
                Err(_closed) => return tally,
            }
        }
        let sent = Instant::now();
        if sent >= end {
            return tally;
        }
        let result = client.call().await;
        if sent < measure_from {
            continue;
        }
        match result {
            Ok(()) => tally
                .latencies_us
                .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
}

/// `--rate`: one send ticket every 1/rate s from `start` to `end`, handed out on a plain
/// thread, whose sleep is good to tens of microseconds. Paced on tokio's timer, whose wheel
/// turns in 1 ms steps, 5,000 req/s went out as bursts of five each millisecond, and the
/// gateway's added time measured the bursts. Tickets that fall due while the thread waits
/// for a CPU go at once, so the rate holds, as in wrk2. The semaphore hands tickets to idle
/// connections in turn and is closed at the end.
fn pace(rate: f64, start: Instant, end: Instant) -> Arc<Semaphore> {
    let tickets = Arc::new(Semaphore::new(0));
    let period = Duration::from_secs_f64(1.0 / rate);
    let sender = tickets.clone();
    std::thread::spawn(move || {
        let mut next = start;
        while next < end {
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sender.add_permits(1);
            next += period;
        }
        sender.close();
    });
    tickets
}

fn main() {
    let args = Args::parse();
    let rt = shared::runtime();
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let tickets = args.rate.map(|rate| pace(rate, start, end));
    let tallies = rt.block_on(async {
        let runs =
            (0..args.connections).map(|_| run_connection(&args, tickets.as_deref(), measure_from, end));
        futures_util::future::join_all(runs).await
    });
    let mut all = Tally::default();
    for t in tallies {
        all.latencies_us.extend(t.latencies_us);
        all.errors += t.errors;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    all.latencies_us.sort_unstable();
    let secs = args.duration.as_secs_f64();
    let report = serde_json::json!({
        "protocol": format!("{:?}", args.protocol).to_lowercase(),
        "connections": args.connections,
        "rate": args.rate,
        "requests": all.latencies_us.len(),
        "errors": all.errors,
        "first_error": all.first_error,
        "rps": all.latencies_us.len() as f64 / secs,
        "p50_ms": shared::percentile_ms(&all.latencies_us, 0.50),
        "p99_ms": shared::percentile_ms(&all.latencies_us, 0.99),
        "max_ms": shared::percentile_ms(&all.latencies_us, 1.0),
    });
    println!("{report}");
}
