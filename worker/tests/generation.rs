//! Generative groups (SmolLM2) through rank 0's `Generate`, on the real binaries: the
//! reference answer streamed by one rank and by a 3-rank group under `launch`, bad
//! requests refused, cancelled and expired sequences freeing their cache, and a follower
//! killed mid-stream.

use std::time::{Duration, Instant};

use rankway_proto::worker::worker_client::WorkerClient;
use rankway_proto::worker::{
    ChatMessage, FinishReason, GenerateRequest, GenerateResponse, Generation, GroupStatusRequest,
    InferRequest, ModelKind,
};
use serde_json::Value;
use tonic::transport::Channel;

use rankway_system_tests::{
    Launcher, Worker, get_text, long_answer_cases, promtool, sample_sum, sigkill, signal, smollm2_arg,
    smollm2_reference,
};

fn request(case: &Value, max_tokens: u32) -> GenerateRequest {
    let messages = case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().to_owned().into(),
        })
        .collect();
    GenerateRequest {
        model: "smollm2".into(),
        messages,
        max_tokens,
        ..Default::default()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every message of a stream, or the status that ended it.
async fn collect(
    client: &mut WorkerClient<Channel>,
    req: GenerateRequest,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.push(msg);
    }
    Ok(out)
}

async fn generation(client: &mut WorkerClient<Channel>) -> Generation {
    let s = client
        .group_status(GroupStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.kind, ModelKind::Generative as i32);
    s.generation_state.expect("a generative group reports its load")
}

/// The stream of the fixture's first case, checked against the reference.
async fn assert_reference_answer(client: &mut WorkerClient<Channel>) {
    let f = smollm2_reference();
    let case = &f["cases"][0];
    let msgs = collect(client, request(case, 24)).await.unwrap();
    let last = msgs.last().unwrap();
    let tokens: Vec<u32> = msgs.iter().flat_map(|m| m.token_ids.clone()).collect();
    let text: String = msgs.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(tokens, ids(&case["greedy_ids"]));
    assert_eq!(
        text,
        case["greedy_text"].as_str().unwrap().replace("<|im_end|>", "")
    );
    assert_eq!(last.finish_reason, FinishReason::Stop as i32);
    assert_eq!(
        last.prompt_tokens as usize,
        case["prompt_ids"].as_array().unwrap().len()
    );
    assert_eq!(last.completion_tokens as usize, tokens.len());
    assert!(
        msgs[..msgs.len() - 1].iter().all(|m| m.finish_reason == 0),
        "only the last message finishes"
    );
}

async fn wait_free(client: &mut WorkerClient<Channel>, within: Duration) -> Generation {
    let deadline = Instant::now() + within;
    loop {
        let g = generation(client).await;
        if g.free_kv_tokens == g.total_kv_tokens && g.running_sequences == 0 {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "cache not freed within {within:?}: {g:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_rank_streams_the_reference_answer_and_refuses_bad_requests() {
    let worker = Worker::start(&["--model=smollm2", &smollm2_arg(), "--kv-cache-tokens=4096"]);
    worker.wait_serving(Duration::from_secs(60)).await;
    let mut client = worker.client().await;
    assert_reference_answer(&mut client).await;
    let idle = wait_free(&mut client, Duration::from_secs(5)).await;
    assert_eq!((idle.total_kv_tokens, idle.context_length), (4096, 8192));

    // Length: the answer is cut at max_tokens.
    let f = smollm2_reference();
    let msgs = collect(&mut client, request(&f["cases"][1], 5)).await.unwrap();
    let last = msgs.last().unwrap();
    assert_eq!(
        (last.finish_reason, last.completion_tokens),
        (FinishReason::Length as i32, 5)
    );
    // A stop string ends the text before it.
    let mut stop = request(&f["cases"][0], 24);
    stop.stop = vec!["Paris".into()];
    let msgs = collect(&mut client, stop).await.unwrap();
    let text: String = msgs.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(text, "The capital of France is ");
    assert_eq!(msgs.last().unwrap().finish_reason, FinishReason::Stop as i32);

    let base = request(&f["cases"][0], 8);
    let user = |content: &[u8]| ChatMessage {
        role: "user".into(),
        content: content.to_vec().into(),
    };
    let bad: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                messages: vec![],
                ..base.clone()
            },
            "the prompt is empty",
        ),
        (
            GenerateRequest {
                messages: vec![user(b"  ")],
                ..base.clone()
            },
            "the prompt is empty",
        ),
        (
            GenerateRequest {
                messages: vec![ChatMessage {
                    role: "wizard".into(),
                    content: "hi".into(),
                }],
                ..base.clone()
            },
            ".role \"wizard\" is not one of",
        ),
        (
            GenerateRequest {
                max_tokens: 0,
                ..base.clone()
            },
            "max_tokens 0",
        ),
        (
            GenerateRequest {
                max_tokens: 8193,
                ..base.clone()
            },
            "max_tokens 8193",
        ),
        (
            GenerateRequest {
                temperature: -0.5,
                ..base.clone()
            },
            "temperature -0.5",
        ),
        (
            GenerateRequest {
                temperature: 1.0,
                top_p: Some(1.5),
                ..base.clone()
            },
            "top_p 1.5",
        ),
        (
            GenerateRequest {
                temperature: 1.0,
                top_p: Some(0.0),
                ..base.clone()
            },
            "top_p 0",
        ),
        (
            GenerateRequest {
                stop: ["a", "b", "c", "d", "e"].map(Into::into).to_vec(),
                ..base.clone()
            },
            "at most 4",
        ),
        (
            GenerateRequest {
                messages: vec![user(b"caf\xc3")],
                ..base.clone()
            },
            "messages[0].content is not valid UTF-8",
        ),
        (
            GenerateRequest {
                prompt: "x".into(),
                ..base.clone()
            },
            "not both",
        ),
        // Prompt plus max_tokens larger than the whole cache: never runnable.
        (
            GenerateRequest {
                max_tokens: 5000,
                ..base.clone()
            },
            "can never fit",
        ),
    ];
    for (req, want) in bad {
        let status = collect(&mut client, req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{want}: {status:?}");
        assert!(status.message().contains(want), "{want}: {:?}", status.message());
    }
    let wrong_model = GenerateRequest {
        model: "minilm".into(),
        ..base.clone()
    };
    assert_eq!(
        collect(&mut client, wrong_model).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let infer = client
        .infer(InferRequest {
            model: "smollm2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(infer.code(), tonic::Code::InvalidArgument);
    assert!(infer.message().contains("use Generate"), "{}", infer.message());
    // Still serving after all of that.
    assert_reference_answer(&mut client).await;
    let text = get_text(format!("http://{}/metrics", worker.metrics)).await;
    promtool("a generative rank 0", &text);
    let generated = sample_sum(&text, "rankway_worker_generated_tokens_total", "");
    assert!(generated >= 2.0 * 8.0 + 5.0, "{generated} tokens counted");
    // Every stream that got a token: two reference answers, the length and stop cases.
    let firsts = sample_sum(&text, "rankway_worker_time_to_first_token_seconds_count", "");
    assert!(firsts >= 4.0, "{firsts} first tokens timed");
}

#[tokio::test]
async fn a_draining_rank_says_it_is_not_ready_and_finishes_its_stream() {
    let worker = Worker::start(&["--model=smollm2", &smollm2_arg(), "--drain-timeout=60s"]);
    worker.wait_serving(Duration::from_secs(60)).await;
    assert_eq!(worker.probe("ready").await, (200, "ready\n".into()));
    let mut client = worker.client().await;
    let mut long = request(&smollm2_reference()["cases"][2], 64);
    long.stop = vec!["never in this text \u{1}".into()];
    let mut stream = client.generate(long).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("a first message");
    signal(worker.proc.child.id(), "TERM");
    // Not ready while it drains, and why; the stream still runs to its end.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = worker.probe("ready").await;
        if status == 503 {
            assert_eq!(body, "not ready: draining\n");
            break;
        }
        assert!(Instant::now() < deadline, "still {status} {body:?} after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m);
    }
    assert_eq!(
        last.expect("more messages").finish_reason,
        FinishReason::Length as i32
    );
}

#[tokio::test]
async fn dropped_and_expired_sequences_free_their_cache() {
    let worker = Worker::start(&["--model=smollm2", &smollm2_arg(), "--kv-cache-tokens=2048"]);
    worker.wait_serving(Duration::from_secs(60)).await;
    let mut client = worker.client().await;
    let idle = wait_free(&mut client, Duration::from_secs(5)).await;
    let f = smollm2_reference();
    let mut long = request(&f["cases"][2], 400); // the reference runs 24 tokens without ending
    long.stop = vec!["never in this text \u{1}".into()];

    // The client drops the stream after two messages.
    let mut stream = client.generate(long.clone()).await.unwrap().into_inner();
    for _ in 0..2 {
        stream.message().await.unwrap().expect("a message");
    }
    let busy = generation(&mut client).await;
    assert_eq!(busy.running_sequences, 1);
    assert!(busy.free_kv_tokens < idle.total_kv_tokens, "{busy:?}");
    drop(stream);
    wait_free(&mut client, Duration::from_secs(5)).await;

    // The deadline passes mid-generation.
    let mut req = tonic::Request::new(long);
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a 400-token answer finished within 300 ms"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_free(&mut client, Duration::from_secs(5)).await;
    let after = generation(&mut client).await;
    assert!(after.steps > 0);
}

#[tokio::test]
async fn a_three_rank_group_generates_and_a_killed_follower_ends_every_stream() {
    let mut launcher = Launcher::start(
        1,
        3,
        &["--model=smollm2", &smollm2_arg(), "--kv-cache-tokens=8192"],
    );
    let (_, pids) = launcher.next_group_start();
    let leader = launcher.leaders[0].clone();
    let connect = || async {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(mut c) = WorkerClient::connect(format!("http://{leader}")).await
                && let Ok(s) = c.group_status(GroupStatusRequest {}).await
                && s.get_ref().ready
            {
                return c;
            }
            assert!(Instant::now() < deadline, "the 3-rank group did not get ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let mut client = connect().await;
    let status = client
        .group_status(GroupStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.world_size, 3);
    assert!(
        status
            .model
            .unwrap()
            .shard_layout
            .starts_with("tp=3 heads/rank=3 kv_heads/rank=1")
    );
    assert_reference_answer(&mut client).await;

    // Eight streams under way, then a follower dies. Their prompts are the reference's
    // that run at least 24 tokens without ending, so all are mid-answer at the kill
    // (a few steps after the last one started).
    let f = smollm2_reference();
    let long = long_answer_cases(&f);
    assert!(long.len() >= 4, "the fixture has long answers");
    let mut streams = Vec::new();
    for i in 0..8 {
        let mut req = request(&long[i % long.len()], 400);
        req.stop = vec!["never in this text \u{1}".into()];
        let mut s = client.generate(req).await.unwrap().into_inner();
        s.message().await.unwrap().expect("a first message");
        streams.push(s);
    }
    // They share steps: rank 0 computes all eight in each.
    let load = generation(&mut client).await;
    assert_eq!(load.running_sequences, 8, "{load:?}");
    // A step of eight takes ~300 ms here (three ranks share two cores, and each step is
    // 60 all-reduces), longer on a busy host: wait for one, not for a fixed time.
    let before = load.shared_steps;
    let deadline = Instant::now() + Duration::from_secs(20);
    while generation(&mut client).await.shared_steps <= before {
        assert!(Instant::now() < deadline, "no shared step within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed = Instant::now();
    sigkill(pids[2]);
    for mut s in streams {
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(5), s.message())
                .await
                .expect("the stream ends")
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a stream finished although its group broke"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let ended = killed.elapsed();
    assert!(
        ended < Duration::from_secs(2),
        "streams ended {ended:?} after the kill"
    );

    // `launch` restarts the group, which answers again.
    let (_, again) = launcher.next_group_start();
    assert_ne!(again, pids);
    let mut client = connect().await;
    assert_reference_answer(&mut client).await;
}
