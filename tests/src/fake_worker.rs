//! A rank 0 that misbehaves on purpose, for what a real worker never does: it declares a
//! text embedding model (`text` BYTES [-1] -> `embedding` FP32 [-1, 4]) and answers each
//! batch as its first text asks: `zero-dim` (shape [rows, 0], no data), `short` (too
//! little data), `rows` (one row too many), anything else a correct reply.

use std::net::SocketAddr;

use rankway_proto::codec::decode_bytes_elements;
use rankway_proto::worker::worker_server::{Worker, WorkerServer};
use rankway_proto::worker::{
    DataType, GenerateRequest, GenerateResponse, GroupStatusRequest, GroupStatusResponse, InferRequest,
    InferResponse, ModelInfo, ModelKind, RankPhase, RankState, Tensor, TensorSpec,
};
use tonic::{Request, Response, Status};

const DIM: i64 = 4;

struct Misbehaving;

fn spec(name: &str, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype: datatype as i32,
        shape,
    }
}

#[tonic::async_trait]
impl Worker for Misbehaving {
    async fn infer(&self, req: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let req = req.into_inner();
        let texts = decode_bytes_elements(&req.inputs[0].data)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rows = texts.len() as i64;
        let (shape, bytes) = match texts[0] {
            b"zero-dim" => (vec![rows, 0], 0),
            b"short" => (vec![rows, DIM], 3),
            b"rows" => (vec![rows + 1, DIM], (rows + 1) * DIM * 4),
            _ => (vec![rows, DIM], rows * DIM * 4),
        };
        let unit = 0.5f32.to_le_bytes();
        let data: Vec<u8> = unit.iter().copied().cycle().take(bytes as usize).collect();
        Ok(Response::new(InferResponse {
            batch_id: req.batch_id,
            outputs: vec![Tensor {
                name: "embedding".into(),
                datatype: DataType::Fp32 as i32,
                shape,
                data: data.into(),
            }],
            model_version: "1".into(),
            ..Default::default()
        }))
    }

    async fn group_status(
        &self,
        _: Request<GroupStatusRequest>,
    ) -> Result<Response<GroupStatusResponse>, Status> {
        Ok(Response::new(GroupStatusResponse {
            group: "fake".into(),
            generation: 1,
            world_size: 1,
            ranks: vec![RankState {
                rank: 0,
                phase: RankPhase::Ready as i32,
                host: "127.0.0.1".into(),
            }],
            model: Some(ModelInfo {
                name: "fake".into(),
                version: "1".into(),
                platform: "fake".into(),
                inputs: vec![spec("text", DataType::Bytes, vec![-1])],
                outputs: vec![spec("embedding", DataType::Fp32, vec![-1, DIM])],
                max_batch_size: 64,
                ..Default::default()
            }),
            ready: true,
            kind: ModelKind::Embedding as i32,
            ..Default::default()
        }))
    }

    type GenerateStream = tokio_stream::Empty<Result<GenerateResponse, Status>>;

    async fn generate(&self, _: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unimplemented("the fake worker does not generate"))
    }
}

/// Serves the misbehaving rank 0 on a loopback port until the test ends.
pub async fn start() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServer::new(Misbehaving))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}
