//! TLS on both front ends against the real binaries (issue 14, finding 6): certificates
//! made in the test with rcgen; REST and gRPC answer over TLS and not in plain text; a
//! new certificate written over the files is presented without a restart; with
//! `--tls-client-ca` only clients with a certificate that CA signed get an answer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rankway_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use rankway_proto::inference::model_infer_request::InferInputTensor;
use rankway_proto::inference::{InferTensorContents, ModelInferRequest};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use rankway_system_tests::{Gateway, Worker};

/// A test CA, and the files the gateway reads.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A certificate and its key, in PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rankway-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "rankway test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca, ca_key }
    }

    fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// Writes the server's certificate and key where the gateway reads them.
    fn install(&self, leaf: &Leaf) {
        // The key first: a reload that sees a new key with the old certificate keeps
        // the old pair and tries again.
        std::fs::write(self.path("server.key"), &leaf.key).unwrap();
        std::fs::write(self.path("server.pem"), &leaf.cert).unwrap();
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn flags(&self) -> [String; 3] {
        [
            format!("--tls-cert={}", self.path("server.pem").display()),
            format!("--tls-key={}", self.path("server.key").display()),
            "--tls-reload-interval=100ms".to_owned(),
        ]
    }

    fn client(&self, alpn: &[u8], identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.path("ca.pem")).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// One REST request over TLS (HTTP/1.1): its status and body.
async fn rest(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let tls = connect(addr, config).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = match body {
        Some(b) => http::Request::post(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(b.to_owned()))),
        None => http::Request::get(path).body(Full::new(Bytes::new())),
    };
    let resp = send
        .send_request(req.unwrap())
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The leaf certificate the server presents to a new connection.
async fn presented(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tls = connect(addr, config).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

const INFER: &str = r#"{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0.5]}]}"#;

/// Waits until the gateway answers /v2/health/ready over TLS with 200.
async fn wait_ready(addr: SocketAddr, config: Arc<rustls::ClientConfig>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = rest(addr, config.clone(), "/v2/health/ready", None).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never became ready over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gateway(worker: &Worker, pki: &Pki, extra: &[&str]) -> Gateway {
    let flags = pki.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    Gateway::start(&[worker], &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_front_ends_serve_tls_and_take_a_new_certificate_without_a_restart() {
    let pki = Pki::new("serve");
    let first = pki.leaf("rankway first", ExtendedKeyUsagePurpose::ServerAuth);
    pki.install(&first);
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"]);
    let gw = gateway(&worker, &pki, &[]);
    let h1 = pki.client(b"http/1.1", None);
    wait_ready(gw.http, h1.clone()).await;

    let (status, body) = rest(gw.http, h1.clone(), "/v2/models/mlp/infer", Some(INFER))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"output\""), "{body}");

    // gRPC over TLS (ALPN h2), through tonic with a TLS connector.
    let h2 = pki.client(b"h2", None);
    let grpc_addr = gw.grpc;
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let h2 = h2.clone();
            async move { connect(grpc_addr, h2).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    let reply = GrpcInferenceServiceClient::new(channel)
        .model_infer(ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 16],
                contents: Some(InferTensorContents {
                    fp32_contents: vec![0.25; 16],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.outputs[0].shape, vec![1, 16]);

    // Plain text gets no answer from either port.
    assert!(reqwest::get(gw.url("/v2/health/ready")).await.is_err());
    let plain = GrpcInferenceServiceClient::connect(format!("http://{}", gw.grpc)).await;
    if let Ok(mut c) = plain {
        assert!(
            c.server_live(rankway_proto::inference::ServerLiveRequest {})
                .await
                .is_err()
        );
    }

    // A new certificate over the files: new handshakes present it.
    assert_eq!(presented(gw.http, h1.clone()).await, der(&first.cert));
    let second = pki.leaf("rankway second", ExtendedKeyUsagePurpose::ServerAuth);
    pki.install(&second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented(gw.http, h1.clone()).await != der(&second.cert) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never presented"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        presented(gw.grpc, pki.client(b"h2", None)).await,
        der(&second.cert)
    );
    let (status, _) = rest(gw.http, h1, "/v2/health/ready", None).await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn with_a_client_ca_only_clients_it_signed_are_answered() {
    let pki = Pki::new("mutual");
    pki.install(&pki.leaf("rankway server", ExtendedKeyUsagePurpose::ServerAuth));
    let worker = Worker::start(&["--model=mlp", "--mlp-hidden=16", "--mlp-layers=1"]);
    let ca_flag = format!("--tls-client-ca={}", pki.path("ca.pem").display());
    let gw = gateway(&worker, &pki, &[&ca_flag]);
    let client = pki.leaf("rankway client", ExtendedKeyUsagePurpose::ClientAuth);
    let with_cert = pki.client(b"http/1.1", Some(&client));
    wait_ready(gw.http, with_cert.clone()).await;

    // Without a certificate, and with one another CA signed: no answer.
    let stranger = Pki::new("stranger");
    let strange = stranger.leaf("someone else", ExtendedKeyUsagePurpose::ClientAuth);
    for config in [
        pki.client(b"http/1.1", None),
        pki.client(b"http/1.1", Some(&strange)),
    ] {
        let r = rest(gw.http, config, "/v2/health/ready", None).await;
        assert!(r.is_err(), "{r:?}");
    }
    let (status, _) = rest(gw.http, with_cert, "/v2/health/ready", None).await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_tls_rank_0_answers_only_the_gateway_with_its_client_certificate() {
    let pki = Pki::new("worker");
    pki.install(&pki.leaf("rankway rank 0", ExtendedKeyUsagePurpose::ServerAuth));
    let [cert, key, _] = pki.flags();
    let ca_flag = format!("--tls-client-ca={}", pki.path("ca.pem").display());
    let worker = Worker::start(&[
        "--model=mlp",
        "--mlp-hidden=16",
        "--mlp-layers=1",
        &cert,
        &key,
        &ca_flag,
    ]);

    let gateway_identity = pki.leaf("rankway gateway", ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(pki.path("gateway.pem"), &gateway_identity.cert).unwrap();
    std::fs::write(pki.path("gateway.key"), &gateway_identity.key).unwrap();
    let ca = format!("--worker-tls-ca={}", pki.path("ca.pem").display());
    let gw = Gateway::start(
        &[&worker],
        &[
            &ca,
            &format!("--worker-tls-cert={}", pki.path("gateway.pem").display()),
            &format!("--worker-tls-key={}", pki.path("gateway.key").display()),
            // The rank's certificate names localhost; the group's address is 127.0.0.1.
            "--worker-tls-server-name=localhost",
        ],
    );
    gw.wait_model_ready("mlp").await;
    let r = reqwest::Client::new()
        .post(gw.url("/v2/models/mlp/infer"))
        .header("content-type", "application/json")
        .body(INFER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // In plain text the rank answers nothing; a gateway that trusts its CA but has no
    // client certificate never sees the group ready, and says why.
    let plain =
        rankway_proto::worker::worker_client::WorkerClient::connect(format!("http://{}", worker.addr)).await;
    if let Ok(mut c) = plain {
        assert!(
            c.group_status(rankway_proto::worker::GroupStatusRequest {})
                .await
                .is_err()
        );
    }
    let anonymous = Gateway::start(&[&worker], &[&ca, "--worker-tls-server-name=localhost"]);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let groups = rankway_system_tests::admin_groups(&http, &anonymous.url("")).await;
        let text = serde_json::to_string(&groups).unwrap();
        if groups[0]["last_error"].is_string() || text.contains("transport error") {
            assert_eq!(groups[0]["ready"], false, "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
