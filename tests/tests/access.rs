//! Who may call what, against the real binaries: API keys guard everything but the
//! probes and reload on change; an admin listener takes the operator routes off the REST
//! server; a rank 0 with a token answers only callers that carry it; a message that is not
//! protobuf is INVALID_ARGUMENT on both gRPC servers.

use std::time::Duration;

use rankway_proto::worker::DataType;
use serde_json::Value;
use tonic::Code;

use crate::hostile_input::{assert_mlp_serves, batch, infer_refused};
use rankway_system_tests::{Gateway, Worker, admin_groups, free_port, get_text};

fn key_file(tag: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("rankway-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

#[tokio::test]
async fn with_api_keys_only_probes_pass_without_one_and_keys_reload() {
    let (dir, file) = key_file("api-keys", "# two keys\nkey-one\nkey-two\n");
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"]);
    let flag = format!("--api-key-file={}", file.display());
    let gateway = Gateway::start(&[&worker], &[&flag, "--api-key-reload-interval=100ms"]);
    let http = reqwest::Client::new();
    let get = |path: &str, key: Option<&str>| {
        let mut r = http.get(gateway.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    // Probes are open; everything else needs a key, in each front end's error shape.
    for path in ["/v2/health/live", "/v2/health/ready"] {
        assert_ne!(get(path, None).await.unwrap().status(), 401, "{path}");
    }
    for (path, key) in [
        ("/v2", None),
        ("/metrics", None),
        ("/v1/models", Some("key-three")),
        ("/admin/groups", Some("")),
    ] {
        let r = get(path, key).await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        let msg = if path.starts_with("/v1/") {
            &body["error"]["message"]
        } else {
            &body["error"]
        };
        assert!(msg.as_str().unwrap().contains("API key"), "{path}: {body}");
    }
    for key in ["key-one", "key-two"] {
        assert_eq!(get("/metrics", Some(key)).await.unwrap().status(), 200);
    }
    let mut grpc = gateway.grpc_client().await;
    let err = infer_refused(&mut grpc, "mlp").await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut live = tonic::Request::new(rankway_proto::inference::ServerLiveRequest {});
    assert!(grpc.server_live(live).await.is_ok(), "ServerLive is a probe");
    let mut meta = tonic::Request::new(rankway_proto::inference::ServerMetadataRequest {});
    meta.metadata_mut()
        .insert("authorization", "Bearer key-two".parse().unwrap());
    assert!(grpc.server_metadata(meta).await.is_ok());

    // Revoke key-one, add key-three: taken without a restart.
    std::fs::write(&file, "key-two\nkey-three\n").unwrap(); // a new modification time
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get("/metrics", Some("key-three")).await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "key-three never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get("/metrics", Some("key-one")).await.unwrap().status(), 401);
    live = tonic::Request::new(rankway_proto::inference::ServerLiveRequest {});
    assert!(grpc.server_live(live).await.is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--admin-listen`: `/metrics` and `/admin/*` move to the operator's listener and need
/// no key there; the REST server no longer has them, and its API keys still hold.
#[tokio::test]
async fn an_admin_listener_takes_the_operator_routes_off_the_rest_server() {
    let (dir, file) = key_file("admin-listen", "key-one\n");
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"]);
    let admin = format!("127.0.0.1:{}", free_port());
    let gateway = Gateway::start(
        &[&worker],
        &[
            &format!("--api-key-file={}", file.display()),
            &format!("--admin-listen={admin}"),
        ],
    );
    gateway.wait_ready().await;
    let http = reqwest::Client::new();
    let status = |url: String, key: Option<&'static str>| {
        let mut r = http.get(url);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move { r.send().await.unwrap().status() }
    };

    // The operator's routes, without a key, on the admin listener.
    let metrics = get_text(format!("http://{admin}/metrics")).await;
    assert!(metrics.contains(r#"listener="admin""#), "{metrics}");
    let groups = admin_groups(&http, &format!("http://{admin}")).await;
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["name"], "g0", "{groups:?}");
    // Only them: the API is not served there.
    assert_eq!(status(format!("http://{admin}/v2"), None).await, 404);
    assert_eq!(status(format!("http://{admin}/v1/models"), None).await, 404);

    // On the REST server they are gone, even with a key; the API still wants one.
    for path in ["/metrics", "/admin/groups"] {
        assert_eq!(status(gateway.url(path), Some("key-one")).await, 404, "{path}");
    }
    assert_eq!(status(gateway.url("/v2"), None).await, 401);
    assert_eq!(status(gateway.url("/v2"), Some("key-one")).await, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_rank_0_with_a_token_answers_only_callers_that_carry_it() {
    let (dir, file) = key_file("worker-token", "group-secret\n");
    let token_flag = format!("--token-file={}", file.display());
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1", &token_flag]);
    // Health stays open for the kubelet: this waits on grpc.health.v1.
    worker.wait_serving(Duration::from_secs(30)).await;

    let gateway_flag = format!("--worker-token-file={}", file.display());
    let gateway = Gateway::start(&[&worker], &[&gateway_flag]);
    gateway.wait_model_ready("mlp").await;
    assert_mlp_serves(&gateway).await;

    // Straight to the worker port: no token, a wrong one.
    let req = batch("mlp", ("input", DataType::Fp32, vec![1, 16]), vec![0; 64], vec![]);
    for token in [None, Some("Bearer group-secreT"), Some("group-secret")] {
        let mut call = tonic::Request::new(req.clone());
        if let Some(t) = token {
            call.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        let err = worker.client().await.infer(call).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        assert!(
            err.message().contains("a valid token is required"),
            "{}",
            err.message()
        );
        let mut status = tonic::Request::new(rankway_proto::worker::GroupStatusRequest {});
        if let Some(t) = token {
            status.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        let err = worker.client().await.group_status(status).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }

    // A gateway without the token never routes to the group, and says why.
    let stranger = Gateway::start(&[&worker], &[]);
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let groups = rankway_system_tests::admin_groups(&http, &stranger.url("")).await;
        let text = serde_json::to_string(&groups).unwrap();
        if text.contains("a valid token is required") {
            assert_eq!(groups[0]["ready"], false, "{text}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A unary gRPC call whose message is `message` as sent (not necessarily protobuf), over
/// a bare HTTP/2 connection: the answer's grpc-status and grpc-message.
async fn raw_grpc_call(addr: std::net::SocketAddr, path: &str, message: &[u8]) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    body.send_data(frame.into(), true).unwrap();
    let resp = resp.await.unwrap();
    let mut headers = resp.headers().clone();
    let mut stream = resp.into_body();
    while stream.data().await.is_some() {}
    if let Ok(Some(trailers)) = stream.trailers().await {
        headers.extend(trailers);
    }
    let get = |k: &str| {
        headers
            .get(k)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    // grpc-message is percent-encoded; its spaces are all this needs back.
    (get("grpc-status"), get("grpc-message").replace("%20", " "))
}

#[tokio::test]
async fn a_message_that_is_not_protobuf_is_invalid_argument_on_both_grpc_servers() {
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"]);
    let gateway = Gateway::start(&[&worker], &[]);
    gateway.wait_model_ready("mlp").await;
    // Field 1 (a string), claiming far more bytes than follow.
    let garbage = [0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01];
    for (addr, path) in [
        (gateway.grpc, "/inference.GRPCInferenceService/ModelInfer"),
        (worker.addr, "/rankway.worker.v1.Worker/Infer"),
    ] {
        let (status, message) = raw_grpc_call(addr, path, &garbage).await;
        assert_eq!(status, "3", "{path}: {message}");
        assert!(message.contains("malformed request message"), "{path}: {message}");
    }
    // Still serving.
    assert_mlp_serves(&gateway).await;
}
