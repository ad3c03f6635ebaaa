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

/// Binds a Unix socket that is mode 0600 from the moment it exists, without touching the
/// process-wide umask (other threads may be creating files meanwhile).
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    clear_stale_socket(path)?;
    let socket = tokio::net::UnixSocket::new_stream()?;
    // Linux gives the socket file the mode of the socket's inode, less the umask, so a mode set
    // on the unbound socket is the file's mode when bind() creates it.
    if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    socket.bind(path)?;
    let listener = socket.listen(1024)?;
    // The umask can only take bits away; give back the owner's if it took them.
    if std::fs::symlink_metadata(path)?.permissions().mode() & 0o600 != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
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
            // grpcio, grpc-java and others send the socket's path as :authority, which stock h2
            // answers with RST_STREAM; Cargo.toml patches h2 to serve them. No setting or
            // release of h2, hyper or tonic does it, and a shim would re-parse all HTTP/2
            // traffic (vendor/README.md).
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

    /// Makes one reflection call (list services) with the given `:authority`, frame by frame, so
    /// the test sends exactly what a stock client sends. Returns the response messages, or the
    /// HTTP/2 error that refused the call.
    fn list_services_with_authority(sock: &Path, authority: &str) -> Result<Vec<u8>, String> {
        use std::io::{Read, Write};
        fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            f.extend([kind, flags]);
            f.extend(stream.to_be_bytes());
            f.extend(payload);
            f
        }
        // HPACK "literal without indexing, new name", no Huffman (RFC 7541 section 6.2.2).
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (
                ":path",
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            ),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            block.push(0);
            for s in [name, value] {
                assert!(s.len() < 127, "one-byte HPACK length");
                block.push(s.len() as u8);
                block.extend(s.as_bytes());
            }
        }
        // ServerReflectionRequest { list_services: "" }, behind the gRPC message prefix.
        let message = [0, 0, 0, 0, 2, 0x3a, 0];
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        s.write_all(&frame(4, 0, 0, &[])).unwrap();
        s.write_all(&frame(1, 0x4, 1, &block)).unwrap();
        s.write_all(&frame(0, 0x1, 1, &message)).unwrap();
        let mut body = Vec::new();
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).map_err(|e| format!("read: {e}"))?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).unwrap();
            let code = || u32::from_be_bytes(payload[..4].try_into().unwrap());
            match (kind, stream) {
                (4, 0) if flags & 0x1 == 0 => s.write_all(&frame(4, 0x1, 0, &[])).unwrap(),
                (3, 1) => return Err(format!("RST_STREAM, error code {}", code())),
                (7, _) => return Err(format!("GOAWAY, error code {}", code())),
                (0, 1) => body.extend(&payload),
                _ => {}
            }
            if stream == 1 && matches!(kind, 0 | 1) && flags & 0x1 != 0 {
                return Ok(body);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unix_socket_serves_the_authorities_stock_clients_send() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::csi::proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .unwrap();
        let router: DriverRouter = tonic::transport::Server::builder()
            .layer(crate::metrics::RpcMetricsLayer::new(Default::default()))
            .add_service(reflection);
        let listener = bind_unix(&sock).unwrap();
        let server = tokio::spawn(router.serve_with_incoming(UnixListenerStream::new(listener)));
        let mut refused = Vec::new();
        for authority in [
            // grpc-go (csi-sanity, kubelet, the sidecars) and grpcurl
            "localhost",
            // grpc-core 1.57 and later (Python grpcio, C++, Ruby, PHP): the percent-encoded path
            "tmp%2Frook-rbd%2Fcsi.sock",
            // grpc-swift: the same with the leading slash
            "%2Ftmp%2Frook-rbd%2Fcsi.sock",
            // grpc-java on netty with a DomainSocketAddress, older grpc-go, Bazel: the raw path
            "/var/lib/kubelet/plugins/rbd.csi.ceph.rook.io/csi.sock",
            // clients that leave it empty
            "",
            // a TCP-style authority through a forwarding proxy
            "127.0.0.1:10000",
        ] {
            let sock = sock.clone();
            let answer =
                tokio::task::spawn_blocking(move || list_services_with_authority(&sock, authority))
                    .await
                    .unwrap();
            match answer {
                Ok(body) if body.windows(15).any(|w| w == b"csi.v1.Identity") => {}
                Ok(body) => refused.push(format!("{authority:?}: no csi.v1.Identity in {body:?}")),
                Err(e) => refused.push(format!("{authority:?}: {e}")),
            }
        }
        server.abort();
        assert!(refused.is_empty(), "refused: {refused:#?}");
    }

    fn umask_now() -> String {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        line.split_whitespace().nth(1).unwrap().to_string()
    }

    #[tokio::test]
    async fn binding_never_changes_the_process_umask() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let start = umask_now();
        let (stop, samples) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let watcher = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    seen.insert(umask_now());
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        };
        // Bind until the watcher has looked many times while binds were going on.
        let mut binds = 0;
        while binds < 500 || samples.load(Ordering::Relaxed) < 1000 {
            let sock = dir.path().join(format!("{binds}.sock"));
            drop(bind_unix(&sock).unwrap());
            binds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let seen = watcher.join().unwrap();
        assert_eq!(seen, std::collections::BTreeSet::from([start]));
    }

    /// Run only by `socket_is_0600_under_any_umask`, alone in a child process, since it sets the
    /// umask, which every thread of a process shares.
    #[tokio::test]
    #[ignore = "a child process of socket_is_0600_under_any_umask runs it"]
    async fn bind_under_umask() {
        let Ok(umask) = std::env::var("ROOK_RBD_TEST_UMASK") else {
            eprintln!("ROOK_RBD_TEST_UMASK is not set: this runs only as a child process");
            return;
        };
        unsafe { libc::umask(u32::from_str_radix(&umask, 8).unwrap()) };
        assert_eq!(umask_now(), format!("{umask:0>4}"));
        let sock = std::env::var_os("ROOK_RBD_TEST_SOCK").unwrap();
        let _l = bind_unix(Path::new(&sock)).unwrap();
    }

    #[test]
    fn socket_is_0600_under_any_umask() {
        // 0: nothing masks the mode bind() gives the file, so what we see is the mode it had
        // from the moment it appeared. 277: the umask takes the owner's bits, which come back.
        for umask in ["0", "277"] {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("csi.sock");
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "csi::server::tests::bind_under_umask"])
                .args(["--ignored", "--test-threads=1"])
                .env("ROOK_RBD_TEST_UMASK", umask)
                .env("ROOK_RBD_TEST_SOCK", &sock)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "child with umask {umask}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let meta = std::fs::symlink_metadata(&sock).unwrap();
            assert!(meta.file_type().is_socket());
            assert_eq!(
                meta.permissions().mode() & 0o7777,
                0o600,
                "socket mode under umask {umask}"
            );
        }
    }
}
