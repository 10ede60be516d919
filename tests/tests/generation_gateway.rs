//! Generation through the gateway, on the real binaries: unmodified OpenAI clients (the
//! `openai` SDK and langchain-openai, from tests/clients/openai_clients.py), OIP generate
//! over REST and tritonclient.grpc over ModelStreamInfer (tests/clients/triton_stream.py)
//! get the worker's greedy answer; bad requests get a 400 naming the problem;
//! a client that goes away frees its sequence at rank 0.

use std::process::Command;

use serde_json::{Value, json};

use rankway_system_tests::{
    Gateway, Worker, get_json, get_text, post_json, promtool, smollm2_arg, smollm2_first_answer, sse_data,
    workspace_root,
};

pub(crate) async fn start() -> (Worker, Gateway) {
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
