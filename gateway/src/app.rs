//! Assembles the gateway: pool and health checks, REST and gRPC servers, shutdown.

use std::future::Future;
use std::sync::Arc;

use rankway_proto::inference::grpc_inference_service_server::SERVICE_NAME as OIP_SERVICE;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::auth::ApiKeys;
use crate::config::Config;
use crate::discovery::LeadersDns;
use crate::frontend::http::RestLimits;
use crate::frontend::oip::grpc;
use crate::frontend::router;
use crate::inference::Gateway;
use crate::metrics::Metrics;
use crate::pool::{Group, GroupSettings, Pool, WorkerTls};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rankway_runtime::listen::Listener;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("REST server: {0}")]
    Rest(std::io::Error),
}

/// The sockets the gateway serves on, bound before anything else starts.
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    /// `--admin-listen`'s, when set.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> Result<Self, AppError> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { addr, source })
        };
        Ok(Self {
            http: bind(cfg.http_listen).await?,
            grpc: bind(cfg.grpc_listen).await?,
            admin: match cfg.admin_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
        })
    }
}

/// Runs the gateway until `shutdown` resolves, then drains within `drain_timeout`.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    if cfg.connections.idle_timeout <= cfg.request_timeout {
        // A request waiting on its batch moves no bytes; it must not be cut off as idle.
        return Err(AppError::Config(format!(
            "--idle-timeout ({:?}) must be longer than --request-timeout ({:?})",
            cfg.connections.idle_timeout, cfg.request_timeout
        )));
    }
    let load_keys = |path: &Option<std::path::PathBuf>| match path {
        Some(path) => ApiKeys::load(path)
            .map(Some)
            .map_err(|e| AppError::Config(e.to_string())),
        None => Ok(None),
    };
    let worker_token = load_keys(&cfg.worker_token_file)?;
    let token_reloader = worker_token
        .as_ref()
        .map(|k| k.spawn_reloader(cfg.api_key_reload_interval));
    let worker_tls = match &cfg.worker_tls_ca {
        Some(ca) => {
            let identity = cfg.worker_tls_cert.as_deref().zip(cfg.worker_tls_key.as_deref());
            let config = rankway_runtime::tls::client_config(ca, identity)
                .map_err(|e| AppError::Config(e.to_string()))?;
            Some(WorkerTls {
                config,
                server_name: cfg.worker_tls_server_name.clone(),
            })
        }
        None => None,
    };
    let settings = GroupSettings {
        token: worker_token,
        tls: worker_tls,
        max_in_flight: cfg.max_in_flight as usize,
        connect_timeout: cfg.health_timeout,
        breaker_failures: cfg.breaker_failures,
        breaker_cooldown: cfg.breaker_cooldown,
    };
    let groups = cfg
        .groups
        .iter()
        .map(|g| Group::new(g.name.clone(), g.address.clone(), settings.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(AppError::Config)?;
    let rng = match cfg.p2c_seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let pool = Pool::new(groups, settings, rng);
    let api_keys = load_keys(&cfg.api_key_file)?;
    let key_reloader = api_keys
        .as_ref()
        .map(|k| k.spawn_reloader(cfg.api_key_reload_interval));
    let metrics = Arc::new(Metrics::new());
    let tls_files = cfg.tls.files().map_err(|e| AppError::Config(e.to_string()))?;
    let tls = |alpn: &[&[u8]]| {
        cfg.tls
            .config(tls_files.as_ref(), alpn)
            .map_err(|e| AppError::Config(e.to_string()))
    };
    let http_listener = Listener::new(listeners.http, "rest", &cfg.connections, metrics.connections())
        .with_tls(tls(&[b"h2", b"http/1.1"])?);
    let grpc_listener = Listener::new(listeners.grpc, "grpc", &cfg.connections, metrics.connections())
        .with_tls(tls(&[b"h2"])?);
    let tls_reloader = tls_files.map(|f| f.spawn_reloader(cfg.tls.tls_reload_interval));
    let state = Arc::new(
        Gateway::new(pool.clone(), metrics.clone(), cfg.batch(), cfg.request_timeout)
            .with_max_waiting_generations(cfg.max_waiting_generations as usize)
            .with_max_text_bytes(cfg.max_text_bytes),
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let discovery = match cfg.leaders_dns.clone() {
        Some((host, port)) => {
            let dns = LeadersDns::new(host, port, cfg.dns_server, cfg.health_timeout)
                .map_err(|e| AppError::Config(e.to_string()))?;
            Some(tokio::spawn(dns.run(
                pool.clone(),
                cfg.dns_interval,
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let health_checks = tokio::spawn(pool.clone().run_health_checks(
        cfg.health_interval,
        cfg.health_timeout,
        stop_rx.clone(),
    ));

    // grpc.health.v1 follows the pool: SERVING while some group is routable.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let mut ready_rx = pool.subscribe_ready();
    let mut stop_health = stop_rx.clone();
    let health_task = tokio::spawn(async move {
        loop {
            let status = if *ready_rx.borrow_and_update() && !*stop_health.borrow() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in ["", OIP_SERVICE] {
                reporter.set_service_status(service, status).await;
            }
            tokio::select! {
                r = ready_rx.changed() => if r.is_err() { return },
                _ = stop_health.changed() => {}
            }
        }
    });

    // The address a listener got (the configured one, its port chosen when that was 0).
    let bound = |listener: &Listener, addr| {
        listener
            .local_addr()
            .map_err(|source| AppError::Bind { addr, source })
    };
    let http_addr = bound(&http_listener, cfg.http_listen)?;
    let grpc_addr = bound(&grpc_listener, cfg.grpc_listen)?;
    let mut stop_rest = stop_rx.clone();
    let limits = RestLimits {
        max_request_bytes: cfg.max_request_bytes,
        body_timeout: cfg.body_timeout,
    };
    let rest = http_listener.serve_http(
        router::router(
            state.clone(),
            limits,
            metrics.clone(),
            api_keys.clone(),
            listeners.admin.is_none(),
        ),
        async move {
            let _ = stop_rest.wait_for(|s| *s).await;
        },
    );
    let rest = tokio::spawn(rest);
    // The operator's listener: plain HTTP, whatever --tls-cert says (its address keeps
    // clients out, as the metrics ports of the ranks do).
    let (admin_addr, admin) = match listeners.admin.zip(cfg.admin_listen) {
        Some((tcp, configured)) => {
            let listener = Listener::new(tcp, "admin", &cfg.connections, metrics.connections());
            let addr = bound(&listener, configured)?;
            let mut stop_admin = stop_rx.clone();
            let serve =
                listener.serve_http(router::admin_router(state.clone(), metrics.clone()), async move {
                    let _ = stop_admin.wait_for(|s| *s).await;
                });
            (addr.to_string(), Some(tokio::spawn(serve)))
        }
        None => ("-".to_owned(), None),
    };

    let mut stop_grpc = stop_rx.clone();
    let grpc_server = cfg
        .connections
        .grpc_server()
        .layer(crate::request_id::RequestIdLayer::grpc(metrics.clone()))
        .layer(rankway_runtime::grpc_errors::grpc_request_errors(
            cfg.max_request_bytes,
        ))
        .layer(crate::auth::grpc_layer(api_keys))
        .add_service(health_service)
        .add_service(grpc::service(state.clone(), cfg.max_request_bytes))
        .serve_with_incoming_shutdown(grpc_listener.into_incoming(), async move {
            let _ = stop_grpc.wait_for(|s| *s).await;
        });
    let grpc_server = tokio::spawn(async move { grpc_server.await.map_err(AppError::Grpc) });
    let tls_on = cfg.tls.tls_cert.is_some();
    tracing::info!(%http_addr, %grpc_addr, %admin_addr, tls = tls_on, groups = cfg.groups.len(), "gateway listening");

    shutdown.await;
    state.start_draining();
    tracing::info!(drain_timeout = ?cfg.drain_timeout, "shutting down: refusing new connections, draining requests");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        let (r, g) = tokio::join!(rest, grpc_server);
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        (r, g)
    })
    .await;
    health_checks.abort();
    if let Some(d) = discovery {
        d.abort();
    }
    health_task.abort();
    for r in [key_reloader, token_reloader, tls_reloader].into_iter().flatten() {
        r.abort();
    }
    match drained {
        Ok((r, g)) => {
            r.map_err(|e| AppError::Rest(std::io::Error::other(e)))?;
            g.map_err(|e| AppError::Rest(std::io::Error::other(e)))??;
        }
        Err(_) => tracing::warn!("drain timed out; exiting with requests in flight"),
    }
    Ok(())
}
