//! An OTLP/gRPC trace sink for `make bench-tracing`: accepts and counts spans, and prints
//! the count when stopped (SIGTERM or Ctrl-C).
//!
//! `cargo run --release -p rankway-system-tests --example otlp_sink -- 127.0.0.1:4317`

use rankway_system_tests::otlp;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:4317".into());
    let (endpoint, receiver) = otlp::start_receiver_on(&addr).await;
    eprintln!("otlp_sink: listening on {endpoint}");
    rankway_runtime::shutdown::signal_received().await;
    println!("{}", receiver.spans.lock().unwrap().len());
}
