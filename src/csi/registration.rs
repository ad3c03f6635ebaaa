//! kubelet's plugin registration, spoken by the node plugin itself (no node-driver-registrar).
//!
//! kubelet watches `<kubelet-dir>/plugins_registry/` for sockets. On a new one it calls
//! `GetInfo` (our driver name and the CSI socket it should dial) and then
//! `NotifyRegistrationStatus`. kubelet only looks again when a socket appears, so after a
//! refused registration the socket is made anew (after a pause) to ask for another try.

use super::server::bind_unix;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// Generated from `csi-spec/pluginregistration.proto` by `build.rs`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pluginregistration");
}

/// The CSI versions we speak, as kubelet wants them listed.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];
const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(5);

/// Where kubelet is told to find us, and what it said.
#[derive(Debug)]
pub struct Registration {
    driver_name: String,
    /// The CSI socket as kubelet sees it on the host.
    endpoint: PathBuf,
    registered: AtomicBool,
    refused: tokio::sync::Notify,
}

impl Registration {
    pub fn new(driver_name: impl Into<String>, endpoint: impl Into<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            driver_name: driver_name.into(),
            endpoint: endpoint.into(),
            registered: AtomicBool::new(false),
            refused: tokio::sync::Notify::new(),
        })
    }

    /// Whether kubelet has accepted the plugin (since the last socket was made).
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// The registration socket's file name: `<driver>-reg.sock`, as kubelet's docs recommend.
    pub fn socket_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}-reg.sock", self.driver_name))
    }

    /// Serves the registration socket in `dir` for the life of the process, making the socket
    /// again whenever kubelet refuses the plugin. Returns only on a setup error.
    pub async fn serve(self: Arc<Self>, dir: PathBuf) -> anyhow::Result<()> {
        let path = self.socket_path(&dir);
        loop {
            self.registered.store(false, Ordering::Release);
            let listener = bind_unix(&path)?;
            tracing::info!(socket = %path.display(), endpoint = %self.endpoint.display(), "waiting for kubelet to register the plugin");
            let svc = proto::registration_server::RegistrationServer::new(RegistrationService {
                state: self.clone(),
            });
            // After a refusal the server stops gracefully (kubelet gets its answer), the socket
            // goes (kubelet forgets the plugin) and comes back after a pause: kubelet sees a new
            // plugin and tries once more.
            let state = self.clone();
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    state.refused.notified().await;
                })
                .await?;
            let _ = std::fs::remove_file(&path);
            tokio::time::sleep(RETRY_AFTER_REFUSAL).await;
        }
    }
}

struct RegistrationService {
    state: Arc<Registration>,
}

#[tonic::async_trait]
impl proto::registration_server::Registration for RegistrationService {
    async fn get_info(
        &self,
        _: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::PluginInfo>, Status> {
        Ok(Response::new(proto::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.state.driver_name.clone(),
            endpoint: self.state.endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<proto::RegistrationStatus>,
    ) -> Result<Response<proto::RegistrationStatusResponse>, Status> {
        let r = req.into_inner();
        if r.plugin_registered {
            tracing::info!(driver = %self.state.driver_name, "kubelet registered the plugin");
            self.state.registered.store(true, Ordering::Release);
        } else {
            tracing::error!(driver = %self.state.driver_name, error = %r.error, "kubelet refused to register the plugin; offering it again shortly");
            self.state.registered.store(false, Ordering::Release);
            self.state.refused.notify_one();
        }
        Ok(Response::new(proto::RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::proto::registration_client::RegistrationClient;
    use super::*;

    async fn dial(path: PathBuf) -> RegistrationClient<tonic::transport::Channel> {
        let ch = tonic::transport::Endpoint::try_from("http://localhost")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        RegistrationClient::new(ch)
    }

    async fn wait_for_socket(path: &Path) {
        for _ in 0..1000 {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} never came up", path.display());
    }

    /// Plays kubelet's part: GetInfo, then a verdict.
    #[tokio::test]
    async fn kubelet_learns_name_endpoint_and_versions_and_a_refusal_makes_the_socket_anew() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registration::new(
            "rbd.csi.ceph.rook.io",
            "/var/lib/kubelet/plugins/x/csi.sock",
        );
        let sock = reg.socket_path(dir.path());
        assert!(sock.ends_with("rbd.csi.ceph.rook.io-reg.sock"));
        tokio::spawn(reg.clone().serve(dir.path().to_path_buf()));
        wait_for_socket(&sock).await;

        let mut c = dial(sock.clone()).await;
        let info = c
            .get_info(proto::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "rbd.csi.ceph.rook.io");
        assert_eq!(info.endpoint, "/var/lib/kubelet/plugins/x/csi.sock");
        assert_eq!(info.supported_versions, vec!["1.0.0"]);
        assert!(!reg.registered());
        c.notify_registration_status(proto::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
        assert!(reg.registered());

        // A refusal: the socket goes away (kubelet sees a removal) and comes back later.
        c.notify_registration_status(proto::RegistrationStatus {
            plugin_registered: false,
            error: "version mismatch".into(),
        })
        .await
        .unwrap();
        assert!(!reg.registered());
        drop(c);
        let mut gone = false;
        for _ in 0..100 {
            if !sock.exists() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "the socket was not removed after a refusal");
        wait_for_socket(&sock).await;
        let info = dial(sock).await.get_info(proto::InfoRequest {}).await;
        assert_eq!(info.unwrap().into_inner().name, "rbd.csi.ceph.rook.io");
    }
}
