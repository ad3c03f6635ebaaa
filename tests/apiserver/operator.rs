//! The `rook-rbd operator` process as the operator tests run it (one per namespace, its
//! connection through the environment as in a pod), and polling with a deadline.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `rook-rbd operator` process for one namespace; killed when dropped.
pub struct Operator {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    pub fn start(server: &'static super::ApiServer, namespace: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("operator.log");
        let (kubeconfig, ns, log_path) = (
            server.kubeconfig.clone(),
            namespace.to_string(),
            log.clone(),
        );
        let child = super::on_spawner_thread(move || {
            let out = std::fs::File::create(&log_path).unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_rook-rbd"));
            cmd.arg("operator")
                // The connection through the environment, as in a pod: nothing secret in argv.
                .env("KUBECONFIG", &kubeconfig)
                .env("ROOK_RBD_WATCH_NAMESPACE", &ns)
                .env("RUST_LOG", "info,rook_rbd=debug")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out);
            super::die_with_parent(&mut cmd);
            cmd.spawn().expect("rook-rbd operator starts")
        });
        Operator {
            child,
            log,
            _dir: dir,
        }
    }

    /// SIGKILL, as a node failure or an OOM kill would: no chance to finish anything.
    pub fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log_text()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, for at most 90 s (a deadline for a loaded machine and a
/// few retry backoffs, not a speed check); the panic names what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 90 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
