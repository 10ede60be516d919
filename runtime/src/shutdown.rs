//! The shutdown signal both binaries drain on.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGTERM (Kubernetes, systemd, `launch`) or SIGINT (Ctrl-C).
pub async fn signal_received() {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
