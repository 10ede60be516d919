//! Real worker + real gateway on loopback: MiniLM embeddings over OIP REST, OpenAI REST
//! and OIP gRPC match the sentence-transformers reference (cosine >= 0.9999).

use base64::Engine;
use rankway_proto::codec::encode_bytes_elements;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_proto::inference::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ServerReadyRequest,
};
use rankway_system_tests::{
    Gateway, Reference, Worker, assert_matches_reference, f32s, json_f32s, reference,
};
use serde_json::{Value, json};

fn rows(data: &Value, dim: usize) -> Vec<Vec<f32>> {
    json_f32s(data).chunks(dim).map(<[f32]>::to_vec).collect()
}

/// The reference sentences as one OIP v2 REST request (id `req-1`); its JSON answer.
async fn infer_reference(gw: &Gateway, r: &Reference) -> Value {
    let body = json!({
        "id": "req-1",
        "inputs": [{"name": "text", "shape": [r.sentences.len()], "datatype": "BYTES", "data": r.sentences}],
    });
    let resp = reqwest::Client::new()
        .post(gw.url("/v2/models/minilm/infer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The output tensor `name` of an OIP v2 JSON answer.
fn output<'a>(v: &'a Value, name: &str) -> &'a Value {
    let outputs = v["outputs"].as_array().unwrap();
    outputs.iter().find(|o| o["name"] == name).unwrap()
}

fn token_counts(v: &Value) -> Vec<i64> {
    let data = output(v, "token_count")["data"].as_array().unwrap();
    data.iter().map(|x| x.as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_sentence_transformers_over_every_protocol() {
    let r = reference();
    let worker = Worker::start(&[]);
    let gw = Gateway::start(&[&worker], &[]);
    gw.wait_ready().await;
    let http = reqwest::Client::new();

    // OIP v2 REST
    let v = infer_reference(&gw, &r).await;
    assert_eq!(v["id"], "req-1");
    assert_eq!(v["model_name"], "minilm");
    let (emb, counts) = (output(&v, "embedding"), token_counts(&v));
    assert_eq!(emb["datatype"], "FP32");
    assert_eq!(emb["shape"], json!([r.sentences.len(), 384]));
    assert_matches_reference("OIP REST", &rows(&emb["data"], 384), &r.embeddings, &r.sentences);
    assert_eq!(
        counts, r.token_counts,
        "token counts (the long text is truncated at 256)"
    );
    assert_eq!(*counts.last().unwrap(), 256);

    // Only the requested output comes back.
    let body = json!({
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [r.sentences[0]]}],
        "outputs": [{"name": "token_count"}],
    });
    let v: Value = http
        .post(gw.url("/v2/models/minilm/infer"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(v["outputs"][0]["name"], "token_count");

    // OpenAI embeddings, float and base64 (the official client's default)
    for format in ["float", "base64"] {
        let body = json!({"model": "minilm", "input": r.sentences, "encoding_format": format});
        let resp = http
            .post(gw.url("/v1/embeddings"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "encoding_format {format:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "list", "encoding_format {format:?}");
        assert_eq!(v["model"], "minilm", "encoding_format {format:?}");
        let data = v["data"].as_array().unwrap();
        let got: Vec<Vec<f32>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| {
                assert_eq!(d["index"], i);
                assert_eq!(d["object"], "embedding");
                match format {
                    "float" => json_f32s(&d["embedding"]),
                    _ => f32s(
                        &base64::engine::general_purpose::STANDARD
                            .decode(d["embedding"].as_str().unwrap())
                            .unwrap(),
                    ),
                }
            })
            .collect();
        assert_matches_reference(&format!("OpenAI {format}"), &got, &r.embeddings, &r.sentences);
        let total: i64 = r.token_counts.iter().sum();
        assert_eq!(v["usage"]["prompt_tokens"], total);
        assert_eq!(v["usage"]["total_tokens"], total);
    }
    // A single string is one input.
    let v: Value = http
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "minilm", "input": r.sentences[1]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let one = vec![json_f32s(&v["data"][0]["embedding"])];
    assert_matches_reference(
        "OpenAI single string",
        &one,
        &r.embeddings[1..2],
        &r.sentences[1..2],
    );

    // OIP v2 gRPC: raw_input_contents and typed contents
    let mut grpc = gw.grpc_client().await;
    assert!(
        grpc.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = grpc
        .model_metadata(ModelMetadataRequest {
            name: "minilm".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.inputs[0].datatype, "BYTES");
    assert_eq!(meta.outputs[0].shape, vec![-1, 384]);
    let n = r.sentences.len() as i64;
    let input = InferInputTensor {
        name: "text".into(),
        datatype: "BYTES".into(),
        shape: vec![n],
        ..Default::default()
    };
    let raw_req = ModelInferRequest {
        model_name: "minilm".into(),
        id: "g-1".into(),
        inputs: vec![input.clone()],
        raw_input_contents: vec![encode_bytes_elements(&r.sentences).into()],
        ..Default::default()
    };
    let typed_req = ModelInferRequest {
        model_name: "minilm".into(),
        inputs: vec![InferInputTensor {
            contents: Some(InferTensorContents {
                bytes_contents: r
                    .sentences
                    .iter()
                    .map(|s| s.clone().into_bytes().into())
                    .collect(),
                ..Default::default()
            }),
            ..input
        }],
        ..Default::default()
    };
    for (what, req) in [("gRPC raw", raw_req), ("gRPC typed", typed_req)] {
        let resp = grpc.model_infer(req).await.unwrap().into_inner();
        let i = resp.outputs.iter().position(|o| o.name == "embedding").unwrap();
        assert_eq!(resp.outputs[i].shape, vec![n, 384], "{what}");
        assert_eq!(resp.outputs[i].datatype, "FP32", "{what}");
        let got: Vec<Vec<f32>> = f32s(&resp.raw_output_contents[i])
            .chunks(384)
            .map(<[f32]>::to_vec)
            .collect();
        assert_matches_reference(what, &got, &r.embeddings, &r.sentences);
    }

    // grpc.health.v1 on the gateway says SERVING once a group is ready.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gw.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "inference.GRPCInferenceService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// A batch over `--sub-batch-tokens` runs as passes of similar lengths, longest first (a
/// text over the limit alone), and its rows still come back in their order, matching
/// the reference. (With the defaults, the test above runs it as two passes: the long
/// text, then the rest.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_token_limit_runs_as_passes_and_keeps_its_order() {
    let r = reference();
    // Token counts 12, 15, 14, 16, 15, 12, 2, 3, 256: with 64 tokens a pass, the
    // 256-token text goes alone, then four rows of at most 16, then four of at most 12.
    let worker = Worker::start(&["--sub-batch-tokens=64"]);
    let gw = Gateway::start(&[&worker], &[]);
    gw.wait_ready().await;
    let passes = || worker.metric_sum("rankway_worker_batches_total", "");
    let before = passes().await;
    let v = infer_reference(&gw, &r).await;
    let emb = output(&v, "embedding");
    assert_matches_reference(
        "three passes",
        &rows(&emb["data"], 384),
        &r.embeddings,
        &r.sentences,
    );
    assert_eq!(token_counts(&v), r.token_counts);
    assert_eq!(passes().await - before, 3.0, "forward passes of the batch");
}
