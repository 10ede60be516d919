//! Fuzz targets of the front ends (see `rankway_runtime::fuzz`): whatever a client sends,
//! the parsers and the checks against a model's signature answer with a value or an
//! error, never a panic. Each target ends in `validation::validate`, as a request would.

use proptest::prelude::*;
use rankway_proto::codec::encode_bytes_elements;
use rankway_proto::inference::InferTensorContents;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_proto::worker::{DataType, ModelInfo, Tensor, TensorSpec};
use rankway_runtime::fuzz::run;
use serde_json::{Value, json};

use super::http::rest_timeout;
use super::oip::grpc::to_tensors;
use super::oip::json_tensor::input_to_tensor;
use super::oip::rest::InferRequestJson;
use super::openai::embeddings::{EmbeddingsRequest, base64_and_texts};
use super::openai::request::{Body, Endpoint, parse};
use crate::request_id::RequestId;
use crate::validation::validate;

/// The two signatures the gateway serves: MiniLM's text in, and the MLP's FP32 rows.
fn models() -> [ModelInfo; 2] {
    let spec = |name: &str, dtype: DataType, shape: Vec<i64>| TensorSpec {
        name: name.into(),
        datatype: dtype as i32,
        shape,
    };
    [
        ModelInfo {
            name: "minilm".into(),
            inputs: vec![spec("text", DataType::Bytes, vec![-1])],
            outputs: vec![spec("embedding", DataType::Fp32, vec![-1, 384])],
            max_batch_size: 32,
            ..Default::default()
        },
        ModelInfo {
            name: "mlp".into(),
            inputs: vec![spec("input", DataType::Fp32, vec![-1, 4])],
            outputs: vec![spec("output", DataType::Fp32, vec![-1, 4])],
            max_batch_size: 32,
            ..Default::default()
        },
    ]
}

/// Checks `inputs` against both signatures (a 64-byte text limit).
fn validate_all(inputs: Vec<Tensor>) {
    for info in models() {
        let _ = validate(&info, inputs.clone(), 64);
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e40f64..1e40).prop_map(Value::from),
        (-3i64..40).prop_map(Value::from),
        "[ -~]{0,8}".prop_map(Value::from),
        "\\PC{0,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn datatype() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "FP32", "BYTES", "INT64", "INT32", "BOOL", "FP64", "FP16", "UINT8"
        ])
        .prop_map(str::to_owned),
        "[A-Z0-9]{0,5}",
    ]
}

fn shape() -> impl Strategy<Value = Vec<i64>> {
    proptest::collection::vec(prop_oneof![-2i64..6, any::<i64>()], 0..4)
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just("text".to_owned()), Just("input".to_owned()), "[a-z]{0,6}"]
}

#[test]
fn fuzz_rest_tensor_decoder() {
    let input = (name(), shape(), datatype(), json_value())
        .prop_map(|(n, s, d, data)| json!({"name": n, "shape": s, "datatype": d, "data": data}));
    let body = prop_oneof![
        proptest::collection::vec(input, 0..3).prop_map(|inputs| json!({ "inputs": inputs }).to_string()),
        json_value().prop_map(|v| v.to_string()),
        "[ -~]{0,48}",
    ];
    run("OIP REST tensor decoder", body, |text| {
        let Ok(req) = serde_json::from_str::<InferRequestJson>(&text) else {
            return;
        };
        if let Ok(inputs) = req.inputs.into_iter().map(input_to_tensor).collect() {
            validate_all(inputs);
        }
    });
}

#[test]
fn fuzz_grpc_infer_validation() {
    let contents = (
        proptest::collection::vec(any::<f32>(), 0..6),
        proptest::collection::vec(any::<i64>(), 0..3),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..3),
        proptest::collection::vec(any::<bool>(), 0..3),
    )
        .prop_map(|(fp32, int64, bytes, bools)| InferTensorContents {
            fp32_contents: fp32,
            int64_contents: int64,
            bytes_contents: bytes.into_iter().map(Into::into).collect(),
            bool_contents: bools,
            ..Default::default()
        });
    let tensor = (name(), datatype(), shape(), proptest::option::of(contents)).prop_map(
        |(name, datatype, shape, contents)| InferInputTensor {
            name,
            datatype,
            shape,
            contents,
            ..Default::default()
        },
    );
    let raw = proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..24),
            proptest::collection::vec("[a-z]{0,80}", 0..3).prop_map(|t| encode_bytes_elements(&t)),
        ],
        0..3,
    );
    run(
        "OIP gRPC request validation",
        (proptest::collection::vec(tensor, 0..3), raw),
        |(inputs, raw)| {
            let raw = raw.into_iter().map(bytes::Bytes::from).collect();
            if let Ok(tensors) = to_tensors(inputs, raw) {
                validate_all(tensors);
            }
        },
    );
}

#[test]
fn fuzz_openai_request_parsers() {
    let field = |strategy: BoxedStrategy<Value>| proptest::option::of(strategy);
    let message = (
        prop_oneof!["user", "system", "assistant", "[a-z]{0,5}"],
        json_value(),
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    let body = (
        field(prop_oneof!["minilm", "[ -~]{0,6}"].prop_map(Value::from).boxed()),
        field(
            prop_oneof![
                proptest::collection::vec(message, 0..3).prop_map(Value::from),
                json_value()
            ]
            .boxed(),
        ),
        field(json_value().boxed()),
        field(prop_oneof![(0u64..5000).prop_map(Value::from), json_value()].boxed()),
        field(json_value().boxed()),
        proptest::collection::btree_map("[a-z_]{1,12}", json_value(), 0..3),
    )
        .prop_map(|(model, messages, prompt, max_tokens, stream, extra)| {
            let mut body: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [
                ("model", model),
                ("messages", messages.clone()),
                ("prompt", prompt),
                ("max_tokens", max_tokens),
                ("stream", stream),
                ("input", messages),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), v);
                }
            }
            body
        });
    run("OpenAI request parsers", body, |body| {
        let text = Value::Object(body.clone()).to_string();
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            let fields: Body = serde_json::from_str(&text).expect("an object");
            let _ = parse(endpoint, fields, None, RequestId("fuzz".into()));
        }
        let Ok(req) = serde_json::from_value::<EmbeddingsRequest>(Value::Object(body)) else {
            return;
        };
        if let Ok((_, texts)) = base64_and_texts(req.encoding_format.as_deref(), req.input) {
            validate_all(vec![Tensor {
                name: "text".into(),
                datatype: DataType::Bytes as i32,
                shape: vec![texts.len() as i64],
                data: encode_bytes_elements(&texts).into(),
            }]);
        }
    });
}

#[test]
fn fuzz_request_timeout_parser() {
    let value = prop_oneof![
        "[0-9.eE+-]{0,12}",
        "[ -~]{0,16}",
        any::<f64>().prop_map(|f| f.to_string())
    ];
    run("Request-Timeout parser", value, |v| {
        let mut headers = http::HeaderMap::new();
        let Ok(v) = http::HeaderValue::from_str(&v) else {
            return;
        };
        headers.insert(super::http::REQUEST_TIMEOUT_HEADER, v);
        if let Ok(Some(d)) = rest_timeout(&headers) {
            // Capped: no client timeout overflows a deadline.
            assert!(d <= std::time::Duration::from_secs(1_000_000_000), "{d:?}");
        }
    });
}
