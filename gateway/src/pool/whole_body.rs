//! The channel to a rank 0, with each call's request body handed to hyper whole.
//!
//! Every worker RPC takes one request message. tonic's generated client streams that
//! message through a body that learns it has ended only when polled again, so hyper's
//! HTTP/2 client sent each call as HEADERS, DATA, and then an empty DATA frame carrying
//! END_STREAM, each in its own `writev` (seen with strace: 50, 826 and 9 bytes per batch).
//! On loopback or a VM's network every write costs the sender the receiver's wake-up.
//! Handing hyper the encoded message as one [`Full`] body, which knows it has ended as
//! soon as its data is taken, lets END_STREAM ride on the DATA frame: two frames a call,
//! which the channel's socket ([`rankway_runtime::coalesce::Coalesce`]) then sends in one
//! write.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full};
use tonic::body::Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps the gateway's channel to one group. Only for RPCs whose request is one message
/// (all of the worker service's): a client-streaming call would wait for its whole
/// request here before sending any of it.
#[derive(Clone, Debug)]
pub struct WholeBody<S>(pub S);

impl<S, ResBody> tower::Service<http::Request<Body>> for WholeBody<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The instance that was polled ready is the one that must be called.
        let fresh = self.0.clone();
        let mut ready = std::mem::replace(&mut self.0, fresh);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let req = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
            ready.call(req).await.map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use prost::Message;
    use rankway_proto::worker::InferRequest;
    use rankway_proto::worker::worker_client::WorkerClient;
    use tonic::codegen::Body as _;

    use super::*;

    /// What the channel under test was handed: the first data frame's length, and
    /// whether the body knew it had ended once that frame was taken.
    type Seen = Arc<Mutex<Option<(usize, bool)>>>;

    /// A channel that records the request body tonic's client hands it, then fails the call.
    fn recording(
        seen: Seen,
    ) -> impl tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = BoxError,
        Future = impl Future<Output = Result<http::Response<Body>, BoxError>> + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |req: http::Request<Body>| {
            let seen = seen.clone();
            async move {
                let mut body = req.into_body();
                let frame = body.frame().await.expect("a data frame")?;
                let len = frame.into_data().expect("data").len();
                *seen.lock().unwrap() = Some((len, body.is_end_stream()));
                Err::<http::Response<Body>, BoxError>("recorded".into())
            }
        })
    }

    async fn first_frame(whole: bool) -> (usize, bool) {
        let seen = Seen::default();
        let request = InferRequest {
            batch_id: 7,
            model: "mlp".into(),
            ..Default::default()
        };
        let result = if whole {
            WorkerClient::new(WholeBody(recording(seen.clone())))
                .infer(request)
                .await
        } else {
            WorkerClient::new(recording(seen.clone())).infer(request).await
        };
        assert!(result.is_err(), "the recording channel fails every call");
        let seen = *seen.lock().unwrap();
        seen.expect("the channel saw the call")
    }

    #[tokio::test]
    async fn the_message_and_its_end_go_to_hyper_together() {
        let framed = 5 + InferRequest {
            batch_id: 7,
            model: "mlp".into(),
            ..Default::default()
        }
        .encoded_len();
        // tonic's own body ends only when polled again: hyper sends END_STREAM apart.
        assert_eq!(first_frame(false).await, (framed, false));
        // Whole, the body has ended once its one frame is taken.
        assert_eq!(first_frame(true).await, (framed, true));
    }
}
