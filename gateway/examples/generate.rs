//! Streams one chat answer from a generative group's rank 0 (`rankway.worker.v1.Worker/
//! Generate`), printing the text as it arrives and the usage at the end.
//!
//!   cargo run --release -p rankway-gateway --example generate -- \
//!     --addr 127.0.0.1:9010 "What is tensor parallelism?"

use std::io::Write;
use std::time::Instant;

use clap::Parser;
use rankway_proto::worker::worker_client::WorkerClient;
use rankway_proto::worker::{ChatMessage, FinishReason, GenerateRequest};

#[derive(Debug, Parser)]
struct Args {
    /// Rank 0 of the generative group.
    #[arg(long, default_value = "127.0.0.1:9010")]
    addr: String,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// The user's message.
    question: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut client = WorkerClient::connect(format!("http://{}", args.addr)).await?;
    let started = Instant::now();
    let mut stream = client
        .generate(GenerateRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: args.question.into_bytes().into(),
            }],
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut first = None;
    while let Some(msg) = stream.message().await? {
        first.get_or_insert_with(|| started.elapsed());
        print!("{}", msg.text);
        std::io::stdout().flush()?;
        if msg.finish_reason != FinishReason::Unspecified as i32 {
            let reason = FinishReason::try_from(msg.finish_reason).map_or("?", |r| r.as_str_name());
            println!(
                "\n[{reason}; {} prompt + {} generated tokens; first token after {:?}, all after {:?}]",
                msg.prompt_tokens,
                msg.completion_tokens,
                first.unwrap_or_default(),
                started.elapsed()
            );
        }
    }
    Ok(())
}
