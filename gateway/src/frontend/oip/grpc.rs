//! OIP v2 over gRPC: `inference.GRPCInferenceService`.
//!
//! Inputs come either in typed `contents` or in `raw_input_contents`; outputs always go
//! back in `raw_output_contents`, as Triton does, which KServe and Triton clients read.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rankway_proto::codec::push_bytes_element;
use rankway_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_proto::inference::model_infer_response::InferOutputTensor;
use rankway_proto::inference::model_metadata_response::TensorMetadata;
use rankway_proto::inference::{
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStreamInferResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use rankway_proto::worker::{DataType, Tensor, TensorSpec};
use tonic::{Request, Response, Status};

use super::grpc_stream;
use crate::error::{ApiError, shown};
use crate::inference::{Gateway, InferCall};
use crate::request_id::{RequestId, WorkerTime};

pub struct InferenceService {
    state: Arc<Gateway>,
}

/// The OIP service with the gateway's message size limit applied to requests.
pub fn service(
    state: Arc<Gateway>,
    max_request_bytes: usize,
) -> GrpcInferenceServiceServer<InferenceService> {
    GrpcInferenceServiceServer::new(InferenceService { state })
        .max_decoding_message_size(max_request_bytes)
        .max_encoding_message_size(usize::MAX)
}

/// The client's deadline from gRPC's `grpc-timeout`, if set.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, ApiError> {
    rankway_proto::grpc_timeout(metadata).map_err(ApiError::InvalidInput)
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

/// Typed `contents` of one input as raw little-endian bytes.
fn contents_to_raw(name: &str, dtype: DataType, c: InferTensorContents) -> Result<Vec<u8>, ApiError> {
    Ok(match dtype {
        DataType::Fp32 => le_bytes(&c.fp32_contents, f32::to_le_bytes),
        DataType::Fp64 => le_bytes(&c.fp64_contents, f64::to_le_bytes),
        DataType::Int64 => le_bytes(&c.int64_contents, i64::to_le_bytes),
        DataType::Int32 => le_bytes(&c.int_contents, i32::to_le_bytes),
        DataType::Bool => c.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        DataType::Bytes => {
            let mut out = Vec::new();
            for b in &c.bytes_contents {
                push_bytes_element(&mut out, b);
            }
            out
        }
        other => {
            return Err(ApiError::InvalidInput(format!(
                "input {}: datatype {} must be sent in raw_input_contents",
                shown(name),
                other.oip_name()
            )));
        }
    })
}

pub(crate) fn to_tensors(
    inputs: Vec<InferInputTensor>,
    raw: Vec<bytes::Bytes>,
) -> Result<Vec<Tensor>, ApiError> {
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(ApiError::InvalidInput(format!(
            "raw_input_contents has {} entries for {} inputs; give one per input or none",
            raw.len(),
            inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    inputs
        .into_iter()
        .map(|i| {
            let dtype = DataType::from_oip_name(&i.datatype).ok_or_else(|| {
                ApiError::InvalidInput(format!(
                    "input {}: unknown datatype {}",
                    shown(&i.name),
                    shown(&i.datatype)
                ))
            })?;
            let data = match (raw.next(), i.contents) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::InvalidInput(format!(
                        "input {} has both contents and raw_input_contents",
                        shown(&i.name)
                    )));
                }
                (Some(r), None) => r,
                (None, Some(c)) => contents_to_raw(&i.name, dtype, c)?.into(),
                (None, None) => bytes::Bytes::new(),
            };
            Ok(Tensor {
                name: i.name,
                datatype: dtype as i32,
                shape: i.shape,
                data,
            })
        })
        .collect()
}

fn metadata(specs: &[TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|s| TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype().oip_name().into(),
            shape: s.shape.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let ready = self.state.model_ready(&req.get_ref().name)?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "rankway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec![],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let info = self.state.model_metadata(&req.get_ref().name)?;
        Ok(Response::new(ModelMetadataResponse {
            name: info.name.clone(),
            versions: vec![info.version.clone()],
            platform: info.platform.clone(),
            inputs: metadata(&info.inputs),
            outputs: metadata(&info.outputs),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let timeout = grpc_timeout(req.metadata())?;
        let request_id = request_id(&req);
        let (answer, worker_time) = infer_one(&self.state, req.into_inner(), timeout, request_id).await?;
        let mut resp = Response::new(answer);
        if let Some(t) = worker_time {
            resp.extensions_mut().insert(t);
        }
        Ok(resp)
    }

    type ModelStreamInferStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

    /// Every request read from the stream runs on its own (at most
    /// [`MAX_STREAM_REQUESTS`] at once); its responses go back on the stream as they come,
    /// a failure as a response with `error_message`. The answer stream ends once the
    /// client closed its side and every request finished; when the client goes away,
    /// the generations under way are cancelled.
    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let timeout = grpc_timeout(req.metadata())?;
        let request_id = request_id(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ModelStreamInferResponse, Status>>(32);
        let state = self.state.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_REQUESTS));
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = tx.closed() => return,
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    let e = ApiError::InvalidInput(format!(
                        "more than {MAX_STREAM_REQUESTS} requests under way on this stream"
                    ));
                    let _ = tx.send(Ok(stream_error(&request, &e))).await;
                    continue;
                };
                let (state, tx, request_id) = (state.clone(), tx.clone(), request_id.clone());
                tokio::spawn(async move {
                    stream_one(&state, request, timeout, request_id, &tx).await;
                    drop(slot);
                });
            }
        });
        let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Requests under way on one `ModelStreamInfer` stream at most.
pub const MAX_STREAM_REQUESTS: usize = 64;

/// The request's id, set by the request-id layer; made here when the service runs
/// without it.
fn request_id<T>(req: &Request<T>) -> RequestId {
    req.extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(|| RequestId::from_header(None))
}

/// One `ModelInfer`: a batch for embedding models, the whole text for generative ones.
async fn infer_one(
    state: &Gateway,
    req: ModelInferRequest,
    timeout: Option<Duration>,
    request_id: RequestId,
) -> Result<(ModelInferResponse, Option<WorkerTime>), ApiError> {
    if state.is_generative(&req.model_name) {
        let generation = grpc_stream::start(state, &req, timeout, request_id).await?;
        let version = generation.model_version.clone();
        let (text, _, finish, usage) = generation.collect().await?;
        let answer = grpc_stream::response(&req.model_name, &version, &req.id, &text, Some((finish, usage)));
        return Ok((answer, None));
    }
    let inputs = to_tensors(req.inputs, req.raw_input_contents)?;
    let served = state
        .infer(InferCall {
            model: req.model_name.clone(),
            inputs,
            outputs: req.outputs.into_iter().map(|o| o.name).collect(),
            timeout,
            request_id,
        })
        .await?;
    let worker_time = WorkerTime(served.worker_time);
    let (meta, raw): (Vec<_>, Vec<_>) = served
        .outputs
        .into_iter()
        .map(|t| {
            let meta = InferOutputTensor {
                name: t.name,
                datatype: DataType::try_from(t.datatype)
                    .unwrap_or_default()
                    .oip_name()
                    .into(),
                shape: t.shape,
                ..Default::default()
            };
            (meta, t.data)
        })
        .unzip();
    let answer = ModelInferResponse {
        model_name: req.model_name,
        model_version: served.model_version,
        id: req.id,
        parameters: Default::default(),
        outputs: meta,
        raw_output_contents: raw,
    };
    Ok((answer, Some(worker_time)))
}

fn stream_error(req: &ModelInferRequest, e: &ApiError) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: e.to_string(),
        infer_response: Some(ModelInferResponse {
            model_name: req.model_name.clone(),
            id: req.id.clone(),
            ..Default::default()
        }),
    }
}

/// One request of a `ModelStreamInfer` stream: a generative model's deltas, or another
/// model's one answer.
async fn stream_one(
    state: &Gateway,
    req: ModelInferRequest,
    timeout: Option<Duration>,
    request_id: RequestId,
    tx: &tokio::sync::mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
) {
    let answer = |r: ModelInferResponse| ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(r),
    };
    if !state.is_generative(&req.model_name) {
        let (model, id) = (req.model_name.clone(), req.id.clone());
        let out = match infer_one(state, req, timeout, request_id).await {
            Ok((r, _)) => answer(r),
            Err(e) => stream_error(
                &ModelInferRequest {
                    model_name: model,
                    id,
                    ..Default::default()
                },
                &e,
            ),
        };
        let _ = tx.send(Ok(out)).await;
        return;
    }
    let generation = match grpc_stream::start(state, &req, timeout, request_id).await {
        Ok(g) => g,
        Err(e) => {
            let _ = tx.send(Ok(stream_error(&req, &e))).await;
            return;
        }
    };
    let (version, mut generation) = (generation.model_version.clone(), generation);
    while let Some(delta) = generation.next().await {
        let out = match delta {
            Ok(d) => answer(grpc_stream::response(
                &req.model_name,
                &version,
                &req.id,
                &d.text,
                d.finish,
            )),
            Err(e) => stream_error(&req, &e),
        };
        // A send fails when the client went away: dropping the generation cancels it.
        if tx.send(Ok(out)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankway_proto::codec::decode_bytes_elements;

    fn input(datatype: &str, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: "text".into(),
            datatype: datatype.into(),
            shape: vec![2],
            contents,
            ..Default::default()
        }
    }

    #[test]
    fn typed_contents_become_raw() {
        let c = InferTensorContents {
            bytes_contents: vec!["ab".into(), "c".into()],
            ..Default::default()
        };
        let t = to_tensors(vec![input("BYTES", Some(c))], vec![]).unwrap();
        assert_eq!(decode_bytes_elements(&t[0].data).unwrap(), vec![&b"ab"[..], b"c"]);
    }

    #[test]
    fn raw_and_contents_conflicts_are_refused() {
        let c = InferTensorContents::default();
        let e = to_tensors(
            vec![input("BYTES", Some(c))],
            vec![bytes::Bytes::from_static(b"x")],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("both contents and raw_input_contents"),
            "{e}"
        );
        let e = to_tensors(
            vec![input("BYTES", None), input("BYTES", None)],
            vec![bytes::Bytes::new()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("one per input"), "{e}");
        let e = to_tensors(vec![input("STRING", None)], vec![]).unwrap_err();
        assert!(e.to_string().contains("unknown datatype"), "{e}");
    }
}
