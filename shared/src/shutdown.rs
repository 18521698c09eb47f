//! One shutdown signal for every service.

use std::future::Future;
use std::pin::Pin;

/// A future that completes when the service should stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Completes on SIGINT or SIGTERM.
pub fn signal() -> Shutdown {
    Box::pin(async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown signal received");
    })
}

/// Spreads one shutdown future to many tasks: the receiver turns `true`
/// once `shutdown` completes.
pub fn fan_out(shutdown: Shutdown) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => { let _ = tx.send(true); }
            // Every receiver is gone: nobody is left to tell.
            _ = tx.closed() => {}
        }
    });
    rx
}

/// Completes once the receiver reads `true` (or its sender is gone).
pub async fn wait(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
