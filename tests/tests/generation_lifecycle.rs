//! Generations through the gateway as their clients and groups come and go, on the real
//! binaries: a client that goes away frees its sequence at rank 0; losing a generative
//! group ends only its streams; SIGTERM lets running streams finish and takes no new ones.

use std::time::{Duration, Instant};

use rankway_proto::worker::GroupStatusRequest;
use serde_json::{Value, json};

use crate::generation_gateway::start;
use rankway_system_tests::{
    Gateway, Launcher, Worker, admin_groups, long_answer_cases, sigkill, signal, smollm2_arg,
    smollm2_reference, sse_data,
};

#[tokio::test]
async fn a_client_that_goes_away_frees_its_sequence() {
    let (worker, gateway) = start().await;
    let rank0 = worker.client().await;
    let load = || {
        let mut c = rank0.clone();
        async move {
            c.group_status(GroupStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .generation_state
                .unwrap()
        }
    };
    let idle = load().await;
    let body = json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": 400,
                      "stop": ["never in this text \u{1}"],
                      "messages": [{"role": "system", "content": "You answer in one short sentence."},
                                   {"role": "user", "content": "Why is the sky blue?"}]});
    let mut resp = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    // The role chunk and three tokens.
    let mut seen = String::new();
    while sse_data(&seen).len() < 4 {
        seen.push_str(&String::from_utf8_lossy(
            &resp.chunk().await.unwrap().expect("more chunks"),
        ));
    }
    let busy = load().await;
    assert_eq!(busy.running_sequences, 1);
    assert!(busy.free_kv_tokens < idle.total_kv_tokens);
    drop(resp);
    let dropped = Instant::now();
    loop {
        let now = load().await;
        if now.running_sequences == 0 && now.free_kv_tokens == now.total_kv_tokens {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(3),
            "sequence still held: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One streamed chat completion read to its end: `Ok(finish_reason)` after `[DONE]`, or
/// the error event's message with when it arrived.
async fn stream_to_end(http: reqwest::Client, url: String, body: Value) -> Result<String, (String, Instant)> {
    let mut resp = http
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| (e.to_string(), Instant::now()))?;
    if !resp.status().is_success() {
        return Err((resp.text().await.unwrap_or_default(), Instant::now()));
    }
    let (mut seen, mut finish) = (String::new(), None);
    while let Ok(Some(chunk)) = resp.chunk().await {
        seen.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = seen.find("\n\n") {
            let event: String = seen.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return finish.ok_or_else(|| ("[DONE] without a finish reason".to_owned(), Instant::now()));
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(e) = v.get("error") {
                return Err((e.to_string(), Instant::now()));
            }
            if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_owned());
            }
        }
    }
    Err((
        "the stream closed without [DONE] or an error".into(),
        Instant::now(),
    ))
}

#[tokio::test]
async fn losing_a_generative_group_ends_only_its_streams() {
    let mut launcher = Launcher::start(
        2,
        3,
        &["--model=smollm2", &smollm2_arg(), "--kv-cache-tokens=4096"],
    );
    let (first, first_pids) = launcher.next_group_start();
    let (_, second_pids) = launcher.next_group_start();
    let victim = if first == "g0" {
        first_pids[2]
    } else {
        second_pids[2]
    };
    let gateway = Gateway::start_addrs(&launcher.leaders, &[]);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while admin_groups(&http, &gateway.url(""))
        .await
        .iter()
        .filter(|g| g["ready"] == true)
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "both groups ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 16 streams over the two groups, on questions whose greedy answers run 24 tokens or
    // more, so every stream is mid-answer at the kill.
    let long: Vec<Value> = long_answer_cases(&smollm2_reference())
        .into_iter()
        .map(|c| c["messages"].clone())
        .collect();
    let streams: Vec<_> = (0..16)
        .map(|i| {
            let body = json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": 20,
                              "messages": long[i % long.len()]});
            tokio::spawn(stream_to_end(
                http.clone(),
                gateway.url("/v1/chat/completions"),
                body,
            ))
        })
        .collect();
    // Both groups are running streams.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let groups = admin_groups(&http, &gateway.url("")).await;
        if groups
            .iter()
            .all(|g| g["load"]["running_sequences"].as_u64().unwrap_or(0) >= 4)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "streams did not reach both groups: {groups:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed = Instant::now();
    sigkill(victim);
    // New requests succeed throughout.
    let ask = json!({"model": "smollm2", "temperature": 0, "max_tokens": 4,
                     "messages": [{"role": "user", "content": "Hi!"}]});
    let chat_url = gateway.url("/v1/chat/completions");
    let resp = http.post(&chat_url).json(&ask).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    let (mut finished, mut failed) = (0, 0);
    for s in streams {
        match s.await.unwrap() {
            Ok(reason) => {
                assert_eq!(reason, "length");
                finished += 1;
            }
            Err((message, at)) => {
                assert!(
                    at.duration_since(killed) < Duration::from_secs(2),
                    "ended {:?} after the kill: {message}",
                    at - killed
                );
                assert!(
                    message.contains("unavailable") || message.contains("group"),
                    "{message}"
                );
                failed += 1;
            }
        }
    }
    assert!(
        failed >= 4 && finished >= 4,
        "{failed} streams failed, {finished} finished"
    );
    let resp = http.post(&chat_url).json(&ask).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn sigterm_lets_running_streams_finish_and_takes_no_new_ones() {
    let worker = Worker::start(&["--model=smollm2", &smollm2_arg(), "--kv-cache-tokens=4096"]);
    let mut gateway = Gateway::start(&[&worker], &["--drain-timeout=30s"]);
    gateway.wait_model_ready("smollm2").await;
    let http = reqwest::Client::new();
    let long = long_answer_cases(&smollm2_reference());
    let url = gateway.url("/v1/chat/completions");
    let streams: Vec<_> = (0..2)
        .map(|i| {
            let body = json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": 24,
                              "messages": long[i]["messages"]});
            tokio::spawn(stream_to_end(http.clone(), url.clone(), body))
        })
        .collect();
    // Both streams under way at rank 0.
    let rank0 = worker.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = rank0
            .clone()
            .group_status(GroupStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.generation_state.unwrap().running_sequences == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the streams did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(gateway.proc.child.id(), "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new generation: the listener is closed (or the answer says it is shutting down).
    let ask = json!({"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi!"}]});
    match http.post(&url).json(&ask).send().await {
        Err(e) => assert!(e.is_connect(), "{e:?}"),
        Ok(r) => {
            assert_eq!(r.status(), 503);
            assert!(r.text().await.unwrap().contains("shutting down"));
        }
    }
    for s in streams {
        assert_eq!(
            s.await.unwrap().map_err(|e| e.0),
            Ok("length".to_owned()),
            "a running stream was cut"
        );
    }
    let exit = tokio::task::spawn_blocking(move || gateway.proc.child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        exit.success(),
        "the gateway exits cleanly after draining: {exit:?}"
    );
}
