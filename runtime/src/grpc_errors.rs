//! The gRPC codes a tonic server answers a malformed request message with.

/// A layer for a tonic server that answers a bad request message with the codes gRPC
/// servers use for a client's mistake: a message over the decoding limit (`limit`
/// bytes), which tonic answers OUT_OF_RANGE, gets RESOURCE_EXHAUSTED; one that is not
/// valid protobuf, which tonic answers INTERNAL as if the server had failed, gets
/// INVALID_ARGUMENT. tonic sends those statuses in the headers and keeps them in the
/// response's extensions, where this finds them.
pub fn grpc_request_errors(
    limit: usize,
) -> tower::util::MapResponseLayer<
    impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone,
> {
    tower::util::MapResponseLayer::new(move |resp: http::Response<tonic::body::Body>| {
        let Some(status) = resp.extensions().get::<tonic::Status>() else {
            return resp;
        };
        let fixed = match status.code() {
            tonic::Code::OutOfRange if status.message().contains("message length too large") => {
                tonic::Status::resource_exhausted(format!(
                    "request message is over the limit of {limit} bytes"
                ))
            }
            tonic::Code::Internal if status.message().starts_with("failed to decode Protobuf message") => {
                // prost's description names the field and the wire problem, not values.
                tonic::Status::invalid_argument(format!("malformed request message: {}", status.message()))
            }
            _ => return resp,
        };
        fixed.into_http()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    /// What the layer makes of a response tonic built from `status`: its grpc-status
    /// and grpc-message headers.
    async fn through_layer(status: tonic::Status) -> (String, String) {
        let inner = tower::service_fn(move |_: ()| {
            let status = status.clone();
            async move { Ok::<_, std::convert::Infallible>(status.into_http::<tonic::body::Body>()) }
        });
        let resp = grpc_request_errors(1024).layer(inner).oneshot(()).await.unwrap();
        let header = |name| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        (header("grpc-status"), header("grpc-message"))
    }

    #[tokio::test]
    async fn a_clients_bad_message_gets_a_clients_code_and_other_statuses_pass() {
        let cases = [
            (
                "over the limit",
                tonic::Status::out_of_range("Error, decoded message length too large: found 2048 bytes"),
                tonic::Code::ResourceExhausted,
                "over the limit of 1024 bytes",
            ),
            (
                "not protobuf",
                tonic::Status::internal("failed to decode Protobuf message: invalid wire type"),
                tonic::Code::InvalidArgument,
                "malformed request message",
            ),
            (
                "the server's own failure",
                tonic::Status::internal("the model thread ended"),
                tonic::Code::Internal,
                "the model thread ended",
            ),
            (
                "another out of range",
                tonic::Status::out_of_range("index 9"),
                tonic::Code::OutOfRange,
                "index 9",
            ),
        ];
        for (name, status, code, message) in cases {
            let (got_code, got_message) = through_layer(status).await;
            assert_eq!(
                got_code,
                (code as i32).to_string(),
                "case {name:?}: {got_message}"
            );
            let decoded = percent_decoded(&got_message);
            assert!(decoded.contains(message), "case {name:?}: {decoded:?}");
        }
    }

    /// grpc-message is percent-encoded.
    fn percent_decoded(s: &str) -> String {
        let (mut out, bytes) = (Vec::new(), s.as_bytes());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }
}
