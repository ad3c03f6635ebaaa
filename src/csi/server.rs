//! Serving the CSI services on a Unix socket (or TCP for debugging), with a safe socket setup and
//! a graceful stop on SIGTERM.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::server::Router;

/// The router with the layers every driver has (today: RPC metrics).
pub type DriverRouter = Router<
    tower::layer::util::Stack<crate::metrics::RpcMetricsLayer, tower::layer::util::Identity>,
>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if let Some(p) = s.strip_prefix("unix://") {
            // Both unix:///abs/path and unix:/abs/path appear in the wild.
            let p = if p.starts_with('/') {
                p.to_string()
            } else {
                format!("/{p}")
            };
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://") {
            return Ok(Endpoint::Tcp(a.to_string()));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        anyhow::bail!("endpoint {s:?}: use unix:///path/to/csi.sock or tcp://host:port")
    }
}

/// Removes a stale socket left by an earlier run, but never a regular file, and never a socket
/// that something still answers on.
fn clear_stale_socket(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    anyhow::ensure!(
        meta.file_type().is_socket(),
        "{} exists and is not a socket; refusing to replace it",
        path.display()
    );
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use by a running process", path.display());
    }
    std::fs::remove_file(path)?;
    Ok(())
}

/// Binds a Unix socket that is mode 0600 from the moment it exists.
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    clear_stale_socket(path)?;
    let old = unsafe { libc::umask(0o177) };
    let res = tokio::net::UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = res?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

pub async fn serve(
    endpoint: &Endpoint,
    router: DriverRouter,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            tracing::info!(endpoint = %path.display(), "serving CSI");
            ready();
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
                .await?;
            let _ = std::fs::remove_file(path);
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(endpoint = %addr, "serving CSI over TCP");
            ready();
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal())
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("unix:///csi/csi.sock").unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:/csi/csi.sock").unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:10000").unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".into())
        );
        assert!(Endpoint::parse("http://x").is_err());
    }

    #[tokio::test]
    async fn socket_is_0600_and_regular_files_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let l = bind_unix(&sock).unwrap();
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // In use: refused.
        assert!(bind_unix(&sock).is_err());
        drop(l);
        // Stale: replaced. (A child forked by a parallel test may hold the old listener's fd
        // for a moment before its exec closes it, so allow a short grace.)
        let mut rebound = false;
        for _ in 0..50 {
            if bind_unix(&sock).is_ok() {
                rebound = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(rebound);
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(bind_unix(&file).is_err());
        assert!(file.exists());
    }
}
