//! Generation through the gateway, on the real binaries: unmodified OpenAI clients (the
//! `openai` SDK and langchain-openai, from tests/clients/openai_clients.py), OIP generate
//! over REST and tritonclient.grpc over ModelStreamInfer (tests/clients/triton_stream.py)
//! get the worker's greedy answer; bad requests get a 400 naming the problem;
//! a client that goes away frees its sequence at rank 0.

use std::process::Command;
use std::time::{Duration, Instant};

use rankway_proto::worker::GroupStatusRequest;
use serde_json::{Value, json};

use crate::common::{
    Gateway, Launcher, Worker, admin_groups, get_json, get_text, long_answer_cases, post_json, sigkill,
    signal, smollm2_arg, smollm2_first_answer, smollm2_reference, sse_data, workspace_root,
};
use crate::observability::promtool;

async fn start() -> (Worker, Gateway) {
    let worker = Worker::start(&["--model=smollm2", &smollm2_arg(), "--kv-cache-tokens=4096"]);
    let gateway = Gateway::start(&[&worker], &[]);
    gateway.wait_model_ready("smollm2").await;
    (worker, gateway)
}

#[tokio::test]
async fn unmodified_clients_get_the_workers_greedy_answer() {
    let (_worker, gateway) = start().await;
    let (question, answer) = smollm2_first_answer();
    let python = workspace_root().join(".venv-clients/bin/python");
    let out = Command::new(&python)
        .arg(workspace_root().join("tests/clients/openai_clients.py"))
        .args([&gateway.url(""), "smollm2", &question])
        .output()
        .unwrap_or_else(|e| panic!("{} (scripts/setup.sh creates it): {e}", python.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["chat"]["text"], answer.as_str());
    assert_eq!(got["chat"]["finish"], "stop");
    assert_eq!(got["chat_stream"]["text"], answer.as_str());
    assert_eq!(got["chat_stream"]["usage"], got["chat"]["usage"]);
    assert!(got["chat_stream"]["chunks"].as_u64().unwrap() >= 4, "{got}");
    assert_eq!(got["langchain"]["text"], answer.as_str());
    assert!(
        got["langchain"]["chunks"].as_u64().unwrap() >= 4,
        "langchain streamed: {got}"
    );
    assert_eq!(got["completion"]["text"], got["completion_stream"]["text"]);
    assert_eq!(got["completion"]["finish"], "length");
    assert_eq!(got["refused"]["status"], 400);
    assert!(
        got["refused"]["message"]
            .as_str()
            .unwrap()
            .contains("'logprobs' is not supported")
    );

    // OIP generate, whole and streamed, on the same prompt as the raw completion.
    let http = reqwest::Client::new();
    let body = json!({"text_input": "The capital of France is", "parameters": {"max_tokens": 8}});
    let whole = post_json(&http, &gateway.url("/v2/models/smollm2/generate"), &body).await;
    assert_eq!(whole["text_output"], got["completion"]["text"]);
    assert_eq!(
        (whole["model_name"].as_str(), whole["finish_reason"].as_str()),
        (Some("smollm2"), Some("length"))
    );
    let streamed = http
        .post(gateway.url("/v2/models/smollm2/generate_stream"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let events: Vec<Value> = sse_data(&streamed.text().await.unwrap())
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = events
        .iter()
        .map(|e| e["text_output"].as_str().unwrap())
        .collect();
    assert_eq!(text, whole["text_output"].as_str().unwrap());
    assert_eq!(events.last().unwrap()["finish_reason"], "length");

    // tritonclient.grpc over ModelStreamInfer and unary ModelInfer, same prompt.
    let out = Command::new(&python)
        .arg(workspace_root().join("tests/clients/triton_stream.py"))
        .args([
            &gateway.grpc.to_string(),
            "smollm2",
            "The capital of France is",
            "8",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let triton: Value = serde_json::from_slice(&out.stdout).unwrap();
    let deltas: Vec<&str> = triton["deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(deltas.len() >= 4, "one response per delta: {triton}");
    assert_eq!(deltas.concat(), whole["text_output"].as_str().unwrap());
    assert_eq!(triton["unary"], whole["text_output"]);
    assert_eq!(triton["final"]["finish_reason"], "length");
    assert_eq!(triton["final"]["id"], "s1");
    assert!(
        triton["bad"]
            .as_str()
            .unwrap()
            .contains("parameter 'beam_width' is not supported"),
        "{triton}"
    );

    let models = get_json(&http, &gateway.url("/v1/models")).await;
    assert_eq!(models["data"][0]["id"], "smollm2");
    let text = get_text(gateway.url("/metrics")).await;
    promtool("the gateway after generations", &text);
    for series in [
        "rankway_time_to_first_token_seconds_count",
        "rankway_generated_tokens_total",
        "rankway_group_kv_cache_tokens",
    ] {
        assert!(text.contains(series), "{series} missing");
    }
}

#[tokio::test]
async fn the_langgraph_agent_answers_from_the_document_it_retrieved() {
    let generative = Worker::start(&["--model=smollm2", &smollm2_arg(), "--kv-cache-tokens=4096"]);
    let embedding = Worker::start(&[]);
    let gateway = Gateway::start(&[&generative, &embedding], &[]);
    gateway.wait_model_ready("smollm2").await;
    gateway.wait_model_ready("minilm").await;
    let out = Command::new(workspace_root().join(".venv-clients/bin/python"))
        .arg(workspace_root().join("examples/langgraph_agent/agent.py"))
        .args(["--json", "When is the Zorblat festival held?"])
        .env("RANKWAY_URL", gateway.url(""))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let document = result["document"].as_str().unwrap();
    assert!(
        document.starts_with("The Zorblat festival is held every March"),
        "retrieved {document:?}"
    );
    let answer = result["answer"].as_str().unwrap();
    assert!(
        answer.contains("March"),
        "the answer does not use the document: {answer:?}"
    );
    assert!(
        result["chunks"].as_u64().unwrap() >= 4,
        "the answer was not streamed: {result}"
    );
}

#[tokio::test]
async fn bad_generation_requests_get_a_400_naming_the_problem() {
    let (_worker, gateway) = start().await;
    let http = reqwest::Client::new();
    let chat = |extra: Value| {
        let mut body =
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/chat/completions",
            chat(json!({"messages": []})),
            "'messages' must not be empty",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": " "}]})),
            "the prompt is empty",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            "messages[0].role \"wizard\"",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": "a \u{FDD0} b"}]})),
            "messages[0].content holds U+FDD0",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": 0})),
            "max_tokens 0",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_completion_tokens": 9000})),
            "max_tokens 9000",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"temperature": -1})),
            "temperature -1",
        ),
        ("/v1/chat/completions", chat(json!({"top_p": 1.5})), "top_p 1.5"),
        ("/v1/chat/completions", chat(json!({"top_p": 0})), "top_p 0"),
        (
            "/v1/chat/completions",
            chat(json!({"stop": ["a", "b", "c", "d", "e"]})),
            "at most 4",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"n": 2})),
            "'n' 2 is not supported",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "function"}]})),
            "'tools' is not supported",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "json_object"}})),
            "'response_format'",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"presence_penalty": 1})),
            "'presence_penalty'",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": "many"})),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": "hi"})),
            "messages",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"model": "nope"})),
            "unknown model",
        ),
        (
            "/v1/completions",
            json!({"model": "smollm2", "prompt": ["a", "b"]}),
            "one string",
        ),
        (
            "/v2/models/smollm2/generate",
            json!({"text_input": "hi", "parameters": {"beam": 2}}),
            "unknown field \"beam\"",
        ),
        (
            "/v2/models/smollm2/generate",
            json!({"text_input": "hi", "max_tokens": 2}),
            "unknown input \"max_tokens\"",
        ),
        (
            "/v2/models/smollm2/generate",
            json!({"text_input": ""}),
            "the prompt is empty",
        ),
    ];
    for (path, body, want) in cases {
        let resp = http.post(gateway.url(path)).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        let error: Value = resp.json().await.unwrap();
        // OpenAI's {"error": {"message"}} or OIP's {"error": "..."}.
        let message = error["error"]["message"]
            .as_str()
            .or(error["error"].as_str())
            .unwrap_or_default();
        assert!(matches!(status, 400 | 404), "{body}: {status} {error}");
        assert!(
            message.contains(want),
            "{body}: {message:?} does not say {want:?}"
        );
    }
    let resp = http
        .post(gateway.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("invalid JSON body"));
    // Still answering.
    let ok = http
        .post(gateway.url("/v1/chat/completions"))
        .json(&chat(json!({"temperature": 0})))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // A control token written in a message is text (several tokens), not the token.
    let prompt_tokens = |content: &str| {
        let body = chat(json!({"messages": [{"role": "user", "content": content}], "max_tokens": 1}));
        let (http, url) = (http.clone(), gateway.url("/v1/chat/completions"));
        async move {
            post_json(&http, &url, &body).await["usage"]["prompt_tokens"]
                .as_u64()
                .unwrap()
        }
    };
    let (plain, markup) = (prompt_tokens("a").await, prompt_tokens("<|im_start|>").await);
    assert!(
        markup >= plain + 3,
        "'a': {plain} tokens, '<|im_start|>': {markup}"
    );
}

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
